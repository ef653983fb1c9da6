"""`intl-convert INPUT OUTPUT`: checkpoint conversion. Placeholder until the converter issue lands."""

import sys


def main(argv=None) -> int:
    print("intl-convert: not implemented yet; no file was written.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
