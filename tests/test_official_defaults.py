"""The rows' settings that follow the official code (issue 21), read from the assembled configs: the
ImageNet-512 rows' E-LatentLPIPS augmentation, latent VGG without flips and float16 guide; the
ImageNet-256 row's MeanFlow c and batch layout; and the other rows without those keys (their
configs, hence their results and store keys, stay as they were)."""

import pytest

from stages.config import REPO, resolve

ROWS = REPO / "config" / "rows"


def row(name):
    return resolve([ROWS / name])


def test_imagenet512_rows():
    for name in ("imagenet512-cmt-ecd.yaml", "imagenet512-cmt-ect.yaml"):
        cfg = row(name)
        assert cfg["midtrain"]["elatentlpips_augment"] == "sony_cmt"
        assert cfg["latent_vgg"]["hflip"] is False
    assert row("imagenet512-cmt-ecd.yaml")["posttrain"]["guidance"]["guide_dtype"] == "float16"


def test_imagenet256_row():
    cfg = row("imagenet256-cmt-mf.yaml")
    for section in (cfg["teacher"]["meanflow"], cfg["posttrain_mf"]):
        assert section["adaptive_c"] == 0.01 and section["label_dropout_rows"] == "leading"
        assert "P_mean_r" not in section and "r_above_t" not in section


@pytest.mark.parametrize("name", ["cifar10-cmt-ect.yaml", "digits-cmt-mf.yaml", "imagenet64-cmt-ecd.yaml"])
def test_other_rows_keep_their_settings(name):
    cfg = row(name)
    assert "elatentlpips_augment" not in cfg["midtrain" if "midtrain" in cfg else "midtrain_mf"]
    if "posttrain_mf" in cfg:
        assert cfg["posttrain_mf"]["adaptive_c"] == 1e-3 and "label_dropout_rows" not in cfg["posttrain_mf"]
    guidance = cfg.get("posttrain", {}).get("guidance") or {}
    assert "guide_dtype" not in guidance
