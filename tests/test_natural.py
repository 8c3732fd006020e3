"""The built-in natural-image source: wallpapers found on disk, procedural images, held-out photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from castle_convert import natural, procedural


def _picture(path: Path, rng: np.random.Generator, dominant: int, size=(480, 420)) -> None:
    """A textured picture whose channel ``dominant`` is the brightest everywhere."""
    x = rng.integers(0, 90, (size[1], size[0], 3)).astype(np.uint8)
    x[..., dominant] = 150 + rng.integers(0, 100, (size[1], size[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x).save(path)


@pytest.fixture
def wallpapers(tmp_path, monkeypatch):
    """A fake /usr/share tree: 24 training pictures (blue), the first 6 held-out photo names (red), a KDE
    package in two sizes, a too-small image and a link pointing out of the tree."""
    rng = np.random.default_rng(0)
    root = tmp_path / "backgrounds"
    for i in range(24):
        _picture(root / f"train_{i:02d}.jpg", rng, dominant=2)
    for name in natural.HELD_OUT[:6]:
        _picture(root / f"{name}.jpg", rng, dominant=0)
    kde = tmp_path / "wallpapers" / "Kite" / "contents" / "images"
    _picture(kde / "800x600.png", rng, 2, (800, 600))
    _picture(kde / "1024x768.png", rng, 2, (1024, 768))
    _picture(root / "tiny.png", rng, 2, (200, 150))
    monkeypatch.setattr(natural, "ROOTS", (str(root), str(tmp_path / "wallpapers")))
    monkeypatch.setenv("CASTLE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_source_names_group_sizes_of_one_picture():
    assert natural.source_name(Path("/usr/share/wallpapers/Path/contents/images/2560x1600.jpg")) == "Path"
    assert natural.source_name(Path("/usr/share/wallpapers/Kay/contents/images_dark/5120x2880.png")) == "Kay-dark"
    assert natural.source_name(Path("/usr/share/backgrounds/mate/abstract/Elephants_3840x2160.jpg")) == "Elephants"
    assert natural.source_name(Path("/usr/share/backgrounds/Storm.jpg")) == "Storm"


def test_sources_split_and_sizes(wallpapers):
    train, held = natural.split_sources()
    names = {s.name for s in train}
    assert len(held) == 6 and {s.name for s in held} == set(natural.HELD_OUT[:6])
    assert "tiny" not in names                                       # < 400 px on the short side
    kite = next(s for s in train if s.name == "Kite")
    assert kite.size == (1024, 768)                                  # the largest size of the picture


def test_held_out_photos_never_reach_the_training_images(wallpapers):
    images = natural.training_images(n=60, size=64, seed=1, procedural_fraction=0.0, progress=False)
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    means = images.reshape(60, -1, 3).mean(1)                        # (60, 3)
    assert (means[:, 2] > means[:, 0]).all()                         # every crop is from a blue training picture
    again = natural.training_images(n=60, size=64, seed=1, procedural_fraction=0.0, progress=False)
    assert np.array_equal(np.asarray(images), np.asarray(again))      # cached, same file
    assert len(list((wallpapers / "cache" / "natural").glob("*.npy"))) == 1


def test_training_images_are_seeded_and_mix_procedural(wallpapers):
    a = natural._make_training_images(40, 48, seed=3, procedural_fraction=0.5)
    b = natural._make_training_images(40, 48, seed=3, procedural_fraction=0.5)
    c = natural._make_training_images(40, 48, seed=4, procedural_fraction=0.5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    red = a.reshape(40, -1, 3).mean(1)
    assert (red[:, 2] <= red[:, 0]).sum() >= 5                       # procedural images are not all blue


def test_held_out_views_cover_every_photo_first(wallpapers):
    views = natural.held_out_views(32)
    assert views.shape == (30, 32, 32, 3)                            # 6 photos × 5 views
    first = natural.held_out_views(32, max_images=6)
    assert np.array_equal(first, views[:6])
    means = first.reshape(6, -1, 3).mean(1)
    assert (means[:, 0] > means[:, 2]).all()                         # the held-out (red) photos
    big = natural.held_out_views(96, max_images=1)[0]
    assert big.shape == (96, 96, 3) and big.std() > 10                # made from the full-size photo


def test_missing_packages_name_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(natural, "ROOTS", (str(tmp_path / "nothing"),))
    with pytest.raises(natural.NaturalDataError, match="apt-get install -y mate-backgrounds"):
        natural.split_sources()


def test_unwritable_cache_names_castle_cache(wallpapers, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("CASTLE_CACHE", str(blocker))
    with pytest.raises(natural.NaturalDataError, match="CASTLE_CACHE"):
        natural.training_images(n=4, size=32, progress=False)


@pytest.mark.parametrize("kind", range(len(procedural.KINDS)))
def test_procedural_images_have_natural_statistics(kind):
    rng = np.random.default_rng(0)
    x = procedural.generate(rng, 128, kind)
    assert x.shape == (128, 128, 3) and x.dtype == np.uint8
    grey = x.astype(np.float64).mean(-1)
    assert grey.std() > 10                                           # not flat
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    yy, xx = np.indices(power.shape) - 64
    r = np.hypot(yy, xx)
    low, high = power[(r > 2) & (r < 8)].mean(), power[(r > 24) & (r < 48)].mean()
    assert low > 10 * high                                           # power falls with frequency, as in photos
    assert np.array_equal(x, procedural.generate(np.random.default_rng(0), 128, kind))


def test_build_data_natural_is_unlabeled(wallpapers):
    import timm

    from castle_convert.data import build_data
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, dynamic_img_size=True)
    data = build_data("natural", model, resolution=32, max_train_samples=12, augmentation="none")
    assert data.num_classes == 0 and len(data.train) == 12 and len(data.val) == 30
    x, y = data.train[0]
    assert tuple(x.shape) == (3, 32, 32) and y == 0
