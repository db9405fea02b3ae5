"""ResNet / DenseNet started from ImageNet weights in torchvision's format.

tests/data/torchvision_state_dict_shapes.json holds every name and shape of torchvision's
resnet18, resnet50 and densenet121 state dicts (written once from torchvision 0.29.1,
which the project does not depend on); each test writes a weights file of random values
with exactly those names, as a user's downloaded .pth has them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from harmonize.classify.config import ModelConfig, TrainConfig
from harmonize.classify.networks import Classifier
from harmonize.classify.pretrained import load_imagenet_weights, torchvision_to_monai
from harmonize.classify.train import fit_classifier, load_classifier, predict, save_classifier

SHAPES = json.loads((Path(__file__).parent / "data" / "torchvision_state_dict_shapes.json")
                    .read_text())


def torchvision_file(tmp_path: Path, arch: str, legacy_names: bool = False,
                     suffix: str = ".pth") -> tuple[Path, dict[str, torch.Tensor]]:
    """Random ImageNet-shaped weights under torchvision's names. legacy_names: DenseNet's
    `norm.1` spelling, as torchvision's published densenet121-a639ec97.pth has it."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in SHAPES[arch].items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(7)
        elif len(shape) == 1:  # normalization: positive, so variances are valid
            value = torch.rand(shape, generator=gen) + 0.5
        else:  # small weights keep 50-120 layers' activations finite
            value = torch.randn(shape, generator=gen) * 0.02
        if legacy_names:
            key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])", r"\1.\2", key)
        state[key] = value
    path = tmp_path / f"{arch}-imagenet{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("arch,stem,deep", [
    ("resnet18", "conv1.weight", "layer4.1.bn2.running_var"),
    ("resnet50", "conv1.weight", "layer4.2.conv3.weight"),
    ("densenet121", "features.conv0.weight",
     "features.denseblock4.denselayer16.conv2.weight")])
def test_every_backbone_tensor_comes_from_the_torchvision_file(tmp_path, arch, stem, deep):
    path, state = torchvision_file(tmp_path, arch)
    torch.manual_seed(1)
    model = Classifier(arch, 64)
    head_before = {k: v.clone() for k, v in model.net.state_dict().items()
                   if k.startswith(("fc.", "class_layers."))}
    loaded = load_imagenet_weights(model, path)
    mine = model.net.state_dict()
    assert loaded == len(SHAPES[arch]) - 2  # all but the 1000-class head's weight and bias
    # the grey stem is the RGB stem summed over its channels
    assert torch.equal(mine[stem], state[stem].sum(dim=1, keepdim=True))
    deep_mine = deep.replace("denselayer16.", "denselayer16.layers.")
    assert torch.equal(mine[deep_mine], state[deep])
    for key, before in head_before.items():  # the new one-logit head starts fresh
        assert torch.equal(mine[key], before)
    assert model.imagenet_input
    out = model.eval()(torch.rand(2, 1, 64, 64))
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_grey_network_answers_as_the_rgb_network_on_the_repeated_image(tmp_path):
    """Summing the stem is exact: the RGB network on a grey image repeated three times
    gives the grey network's output (DenseNet, from the legacy-named published file)."""
    from monai.networks.nets import DenseNet121

    path, state = torchvision_file(tmp_path, "densenet121", legacy_names=True)
    grey = Classifier("densenet121", 64)
    load_imagenet_weights(grey, path)
    rgb = DenseNet121(spatial_dims=2, in_channels=3, out_channels=1)
    rgb_state = torchvision_to_monai({k: v for k, v in state.items()
                                      if not k.startswith("classifier.")}, "densenet121")
    rgb_state["features.conv0.weight"] = torch.load(path)["features.conv0.weight"]
    rgb_state.update({k: v for k, v in grey.net.state_dict().items()
                      if k.startswith("class_layers.")})
    rgb.load_state_dict(rgb_state)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        got = grey.eval()(x)  # normalizes with ImageNet's grey statistics itself
        repeated = rgb.eval()((x.repeat(1, 3, 1, 1) - 0.449) / 0.226).reshape(-1)
    assert torch.allclose(got, repeated, atol=1e-4, rtol=1e-4)


def test_wrong_file_named_with_what_is_wrong(tmp_path):
    path, state = torchvision_file(tmp_path, "resnet50")
    with pytest.raises(ValueError, match=r"resnet50-imagenet.pth: not torchvision's "
                                         r"densenet121 weights \(\d+ missing"):
        load_imagenet_weights(Classifier("densenet121", 64), path)
    del state["layer2.0.bn1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing, e.g. \['layer2.0.bn1.weight'\]"):
        load_imagenet_weights(Classifier("resnet50", 64), path)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not a tensor file")
    with pytest.raises(ValueError, match="notes.pth: not a readable weights file"):
        load_imagenet_weights(Classifier("resnet18", 64), not_weights)
    with pytest.raises(ValidationError, match="arch 'vit' trains from scratch"):
        ModelConfig(arch="vit", pretrained=path)


def test_fine_tuned_from_imagenet_and_reloaded_with_its_input_scaling(tmp_path):
    path, state = torchvision_file(tmp_path, "resnet18", suffix=".safetensors")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((16, 1, 32, 32), dtype=np.float32))
    labels = np.array([0, 1] * 8)
    model_cfg = ModelConfig(arch="resnet18", pretrained=path)
    model = fit_classifier(images, labels, model_cfg,
                           TrainConfig(epochs=1, batch_size=8, progress=False))
    assert model.imagenet_input
    stem = model.net.state_dict()["conv1.weight"]
    start = state["conv1.weight"].sum(dim=1, keepdim=True)
    assert not torch.equal(stem, start)  # trained ...
    assert torch.allclose(stem, start, atol=0.1)  # ... from the file's weights
    from harmonize.classify.config import ClassifierConfig

    cfg = ClassifierConfig.model_validate({"model": model_cfg.model_dump(),
                                           "data": {"image_size": 32}})
    saved = save_classifier(model, tmp_path / "model", cfg, {})
    again, arch, _ = load_classifier(saved)
    assert arch["imagenet_input"] and again.imagenet_input
    assert np.allclose(predict(again, images), predict(model, images), atol=1e-6)


def test_federated_classifier_starts_every_node_from_the_imagenet_file(tmp_path):
    from harmonize.federated.classifier_task import ClassifierTask
    from harmonize.federated.config import load_federated_config

    path, state = torchvision_file(tmp_path, "resnet18")
    config = load_federated_config(None, {"task": "classifier",
                                          "classifier.model.arch": "resnet18",
                                          "classifier.model.pretrained": str(path)})
    task = ClassifierTask(config)
    arrays = task.initial_arrays()  # what the server sends in round 1
    assert torch.equal(arrays["net.layer3.0.conv2.weight"], state["layer3.0.conv2.weight"])
    assert task.build().imagenet_input  # and every node scales its inputs to match


def test_study_names_the_imagenet_file_of_each_further_architecture(tmp_path):
    from harmonize.study.config import StudyConfig

    path, _ = torchvision_file(tmp_path, "densenet121")
    data = {"synth": {"sites": 6, "nodes": 3}}
    config = StudyConfig.model_validate({"data": data, "central": {
        "other_classifiers": ["vit", "densenet121"], "pretrained": {"densenet121": str(path)}}})
    assert config.central.pretrained["densenet121"] == path
    for pretrained, problem in [({"resnet50": str(path)}, "not in other_classifiers"),
                                ({"vit": str(path)}, "vit trains from scratch"),
                                ({"densenet121": str(tmp_path / "none.pth")}, "not found")]:
        with pytest.raises(ValidationError, match=problem):
            StudyConfig.model_validate({"data": data, "central": {
                "other_classifiers": ["vit", "densenet121"], "pretrained": pretrained}})
