#!/usr/bin/python3
"""Writes the reference fixtures for tests/test_image.c.

1. tests/golden/image_pixels.json: for a few real PNG and JPEG files fetched by
   tools/fetch-data.sh, the size, the channel count after topiary's rules
   (gray stays gray, alpha dropped), 64 sampled pixels and an FNV-1a 64-bit
   hash of all decoded (H, W, C) bytes. The reference decoder is Pillow
   (Debian python3-pil, which links the same libjpeg-turbo and libpng).
2. tests/golden/png/*.png: tiny synthetic PNGs in the layouts that need
   conversion (palette, 16-bit gray, 16-bit RGB, gray+alpha, 1-bit), with the
   expected 8-bit pixels computed here from the source arrays, not decoded.
3. tests/golden/resize_bilinear.json: bilinear resizes of small u8 arrays by
   PyTorch F.interpolate (align_corners True and False, antialias False), and
   one torchvision short-side resize + center crop of a tensor.

Run from the repository root with Debian's interpreter:
    /usr/bin/python3 tests/golden/make_image_golden.py [DATA_DIR]
DATA_DIR defaults to $TOPIARY_DATA_DIR or data.
"""
import json
import os
import random
import sys

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = [
    "digits/digits.png",
    "photos/chicky_512.png",
    "photos/graf1.png",
    "photos/opencv-logo.png",
    "photos/dog.jpg",
    "photos/baboon.jpg",
    "photos/messi5.jpg",
]
SAMPLES = 64


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def decode(path):
    im = Image.open(path)
    im.load()
    mode = "L" if im.mode in ("L", "LA", "1", "I;16") else "RGB"
    return im.convert(mode)


def real_images(data_dir):
    out = []
    for rel in FILES:
        im = decode(os.path.join(data_dir, "datasets", rel))
        width, height = im.size
        channels = 1 if im.mode == "L" else 3
        raw = im.tobytes()
        rng = random.Random(rel)
        samples = []
        for _ in range(SAMPLES):
            y, x = rng.randrange(height), rng.randrange(width)
            at = (y * width + x) * channels
            samples.append([y, x] + list(raw[at:at + channels]))
        out.append({
            "file": rel, "width": width, "height": height, "channels": channels,
            "fnv1a64": "%016x" % fnv1a64(raw), "samples": samples,
        })
    return out


def synthetic_pngs():
    """Saves small PNGs and returns their expected decoded pixels."""
    os.makedirs(os.path.join(HERE, "png"), exist_ok=True)
    rng = random.Random(7)
    w, h = 7, 5
    cases = []

    def save(name, im, channels, expected):
        im.save(os.path.join(HERE, "png", name))
        cases.append({"file": name, "width": w, "height": h, "channels": channels,
                      "pixels": expected})

    palette = [rng.randrange(256) for _ in range(3 * 4)]
    idx = [rng.randrange(4) for _ in range(w * h)]
    im = Image.new("P", (w, h))
    im.putpalette(palette + [0] * (768 - len(palette)))
    im.putdata(idx)
    save("palette.png", im, 3, [palette[3 * i + c] for i in idx for c in range(3)])

    g16 = [rng.randrange(65536) for _ in range(w * h)]
    im = Image.new("I;16", (w, h))
    im.putdata(g16)
    save("gray16.png", im, 1, [v >> 8 for v in g16])

    la = [(rng.randrange(256), rng.randrange(256)) for _ in range(w * h)]
    im = Image.new("LA", (w, h))
    im.putdata(la)
    save("gray_alpha.png", im, 1, [g for g, _ in la])

    bits = [rng.randrange(2) for _ in range(w * h)]
    im = Image.new("1", (w, h))
    im.putdata([255 * b for b in bits])
    save("gray1.png", im, 1, [255 * b for b in bits])

    rgba = [tuple(rng.randrange(256) for _ in range(4)) for _ in range(w * h)]
    im = Image.new("RGBA", (w, h))
    im.putdata(rgba)
    save("rgba.png", im, 3, [p[c] for p in rgba for c in range(3)])
    return cases


def resize_cases():
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    rng = random.Random(11)
    cases = []
    for (c, hin, win) in [(1, 5, 7), (3, 4, 6)]:
        pixels = [rng.randrange(256) for _ in range(hin * win * c)]   # (H, W, C)
        x = torch.tensor(pixels, dtype=torch.float32).reshape(1, hin, win, c).permute(0, 3, 1, 2)
        for (hout, wout) in [(9, 11), (3, 4), (1, 1), (hin, win)]:
            for align in (True, False):
                y = F.interpolate(x, size=(hout, wout), mode="bilinear", align_corners=align)
                cases.append({"channels": c, "in_height": hin, "in_width": win,
                              "pixels": pixels, "out_height": hout, "out_width": wout,
                              "align_corners": int(align), "resize_short_side": 0,
                              "expected": [round(v, 6) for v in y.flatten().tolist()]})
    # torchvision Resize(int) on a tensor (antialias off in 0.14) + CenterCrop.
    hin, win, c = 6, 9, 3
    pixels = [rng.randrange(256) for _ in range(hin * win * c)]
    x = torch.tensor(pixels, dtype=torch.float32).reshape(hin, win, c).permute(2, 0, 1)
    y = TF.center_crop(TF.resize(x, 8), [7, 9])
    cases.append({"channels": c, "in_height": hin, "in_width": win, "pixels": pixels,
                  "out_height": 7, "out_width": 9, "align_corners": 0,
                  "resize_short_side": 8,
                  "expected": [round(v, 6) for v in y.flatten().tolist()]})
    return cases


def main():
    data_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TOPIARY_DATA_DIR", "data")
    with open(os.path.join(HERE, "image_pixels.json"), "w") as f:
        json.dump({"decoder": "Pillow " + Image.__version__, "images": real_images(data_dir),
                   "synthetic": synthetic_pngs()}, f, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(HERE, "resize_bilinear.json"), "w") as f:
        json.dump({"reference": "torch F.interpolate / torchvision resize", "cases": resize_cases()},
                  f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
