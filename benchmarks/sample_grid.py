"""Stack the bench's per-row sample grids (`emloc.fashion score --grid`) into one labelled PNG.

    python benchmarks/sample_grid.py OUT.png "zero-shot original=work/eval/zero-shot.png" "LoRA=..." ...

Each grid is two rows of generated samples: the new class on top, classes 0-8 below.
"""

from __future__ import annotations

import sys

from PIL import Image, ImageDraw


def main(out: str, items: list[str], scale: int = 2, label_width: int = 230) -> None:
    rows = []
    for item in items:
        label, path = item.split("=", 1)
        img = Image.open(path).convert("L")
        rows.append((label, img.resize((img.width * scale, img.height * scale), Image.NEAREST)))
    width = label_width + max(img.width for _, img in rows)
    sheet = Image.new("L", (width, sum(img.height + 4 for _, img in rows)), 255)
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, img in rows:
        sheet.paste(img, (label_width, y))
        draw.text((6, y + 4), label, fill=0)
        draw.text((6, y + 20), "top: new-class samples", fill=90)
        draw.text((6, y + 34), "bottom: classes 0-8", fill=90)
        y += img.height + 4
    sheet.save(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
