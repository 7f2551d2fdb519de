"""`eclip train --augment`: open_clip's training transform, random but never mirrored, saved with the run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eclip.config import AUGMENT, TrainConfig
from eclip.errors import EclipError
from eclip.train.setup import training_transform

from train_helpers import build_flags, invoke, train_args


def tricolour(size=128):
    """A vertical blue | white | red tricolour (France's layout)."""
    a = np.zeros((size // 2, size, 3), np.uint8)
    a[:, : size // 3] = (0, 56, 168)
    a[:, size // 3: 2 * size // 3] = 255
    a[:, 2 * size // 3:] = (206, 17, 38)
    return Image.fromarray(a)


def test_without_augment_training_sees_the_eval_transform(tiny_model):
    assert training_transform(tiny_model, None) is tiny_model.preprocess


def test_augment_is_random_at_the_model_size_and_never_mirrors(tiny_model):
    transform = training_transform(tiny_model, AUGMENT)
    torch.manual_seed(0)
    views = [transform(tricolour()) for _ in range(20)]
    assert all(v.shape == tiny_model.preprocess(tricolour()).shape for v in views)
    assert not torch.equal(views[0], views[1]), "augmentation drew the same view twice"
    for v in views:   # blue minus red, in normalised channels: higher on the hoist side than on the fly side
        third = v.shape[-1] // 3
        left, right = v[:, :, :third].mean(dim=(1, 2)), v[:, :, -third:].mean(dim=(1, 2))
        assert left[2] - left[0] > right[2] - right[0] + 0.5, "a flag came out mirrored"


def test_unknown_augmentation_fields_are_refused(tiny_model):
    with pytest.raises(EclipError, match="AugmentationCfg"):
        training_transform(tiny_model, {"flip": 0.5})


@pytest.mark.slow
def test_augment_is_off_by_default_and_recorded_in_the_run_config(tmp_path):
    assert TrainConfig(output="run").augment is None
    flags = build_flags(tmp_path, n_flags=12)
    augmented = tmp_path / "augmented"
    invoke([*train_args(flags, augmented, "--no-experts", "--augment"), "--epochs", "1"])
    assert json.loads((augmented / "config.json").read_text())["augment"] == AUGMENT
    assert (augmented / "best.safetensors").is_file()
