"""`submit <stage> ...`: the launcher. Placeholder until the launcher issue lands."""

import sys


def main(argv=None) -> int:
    print("submit: not implemented yet (the launcher is being built); nothing was submitted.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
