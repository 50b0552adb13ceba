"""Regenerate the small example drawings in examples/images/ (PIL only; deterministic)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).parent / "images"


def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/Library/Fonts"):
        try:
            return ImageFont.truetype(f"{folder}/{name}", size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def house() -> Image.Image:
    """A child's drawing: a house with a red roof, a tree, the sun and a cloud on a green lawn."""
    img = Image.new("RGB", (384, 288), (135, 200, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 210, 384, 288), fill=(90, 170, 70))
    d.ellipse((300, 20, 360, 80), fill=(255, 215, 0))
    for x0 in (60, 90, 120):
        d.ellipse((x0, 40, x0 + 60, 80), fill=(255, 255, 255))
    d.rectangle((110, 140, 230, 230), fill=(230, 200, 150), outline=(80, 50, 30), width=3)
    d.polygon([(95, 142), (170, 80), (245, 142)], fill=(200, 40, 40), outline=(90, 20, 20))
    d.rectangle((155, 180, 185, 230), fill=(120, 70, 30))
    d.rectangle((125, 155, 150, 178), fill=(170, 220, 255), outline=(60, 60, 60), width=2)
    d.rectangle((195, 155, 220, 178), fill=(170, 220, 255), outline=(60, 60, 60), width=2)
    d.rectangle((292, 160, 306, 235), fill=(110, 70, 40))
    d.ellipse((265, 105, 335, 175), fill=(40, 130, 50))
    return img


def bar_chart() -> Image.Image:
    """A labelled bar chart: fruit sold per day."""
    img = Image.new("RGB", (400, 300), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((200, 18), "Fruit sold on Monday", fill=(0, 0, 0), font=font(20, bold=True), anchor="mm")
    d.line((50, 250, 380, 250), fill=(0, 0, 0), width=2)
    d.line((50, 250, 50, 45), fill=(0, 0, 0), width=2)
    bars = [("apples", 12, (220, 50, 50)), ("bananas", 18, (240, 200, 40)), ("grapes", 7, (130, 60, 160)),
            ("oranges", 15, (250, 140, 30))]
    for i, (label, value, color) in enumerate(bars):
        x = 75 + i * 78
        top = 250 - value * 10
        d.rectangle((x, top, x + 50, 249), fill=color)
        d.text((x + 25, top - 12), str(value), fill=(0, 0, 0), font=font(14), anchor="mm")
        d.text((x + 25, 266), label, fill=(0, 0, 0), font=font(14), anchor="mm")
    return img


def street_sign() -> Image.Image:
    """A red octagonal STOP sign on a pole against a cloudy sky."""
    img = Image.new("RGB", (320, 320), (175, 195, 215))
    d = ImageDraw.Draw(img)
    d.rectangle((152, 200, 168, 320), fill=(120, 120, 120))
    cx, cy, r = 160, 120, 95
    import math

    points = [(cx + r * math.cos(math.radians(22.5 + 45 * k)), cy + r * math.sin(math.radians(22.5 + 45 * k)))
              for k in range(8)]
    d.polygon(points, fill=(255, 255, 255))
    inner = [(cx + (r - 8) * math.cos(math.radians(22.5 + 45 * k)), cy + (r - 8) * math.sin(math.radians(22.5 + 45 * k)))
             for k in range(8)]
    d.polygon(inner, fill=(200, 20, 30))
    d.text((cx, cy), "STOP", fill=(255, 255, 255), font=font(52, bold=True), anchor="mm")
    return img


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    house().save(OUT / "house.png", optimize=True)
    bar_chart().save(OUT / "bar_chart.png", optimize=True)
    street_sign().save(OUT / "stop_sign.jpg", quality=85)
    for p in sorted(OUT.iterdir()):
        print(p, p.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
