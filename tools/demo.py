"""`make demo`: runs the whole chain on the embedded data. Grows stage by stage as the pipeline lands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    data = ROOT / "data" / "synthetic"
    manifest = json.loads((data / "manifest.json").read_text())
    c = manifest["counts"]
    print(f"demo: embedded datasets in {data}")
    print(f"  classification: {c['classification']['train']} train / {c['classification']['val']} val images, "
          f"classes {', '.join(manifest['classes'])}")
    print(f"  coco: {c['coco']['train']['images']} train / {c['coco']['val']['images']} val images, "
          f"categories {', '.join(manifest['detection_categories'])}")
    print("demo: the pretraining and transfer stages are not implemented yet; nothing else to run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
