"""A converted model's state_dict holds tensors only (the layers' settings as a uint8 tensor of JSON), so
safetensors, and so Hugging Face's save_pretrained and Trainer checkpoints, store it; older state dicts
(settings as a dict) still load."""
import json

import pytest
import torch
from torch import nn

from _refs import block_llama
from opt_fast.nn import convert


def models():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    return {"block": convert(net, method="cayley_neumann", block_size=4, sides="both"),
            "dense": convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), method="gram_schmidt")}


@pytest.mark.parametrize("kind", ["block", "dense"])
def test_safetensors_round_trip(tmp_path, kind):
    safetensors = pytest.importorskip("safetensors.torch")
    model, fresh = models()[kind], None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    path = str(tmp_path / "model.safetensors")
    safetensors.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    torch.manual_seed(1)
    fresh = models()[kind]
    fresh.load_state_dict(safetensors.load_file(path))
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["block", "dense"])
def test_state_dict_with_settings_as_a_dict_still_loads(kind):
    model = models()[kind]
    sd = model.state_dict()
    for k in [k for k in sd if k.endswith("_extra_state")]:
        sd[k] = json.loads(bytes(sd[k].tolist()).decode())   # the earlier format
        assert isinstance(sd[k], dict) and "method" in sd[k]
    models()[kind].load_state_dict(sd)


def test_other_settings_still_raise():
    model = models()["block"]
    other = convert(nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)), method="cayley",
                    block_size=4, sides="both")
    with pytest.raises(ValueError, match=r"method='cayley_neumann' \(this layer: 'cayley'\)"):
        other.load_state_dict(model.state_dict())


def test_hugging_face_save_pretrained_of_a_converted_model(tmp_path):
    pytest.importorskip("transformers")
    safetensors = pytest.importorskip("safetensors.torch")
    model = block_llama(seed=0)
    model.save_pretrained(str(tmp_path))
    sd = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        sd.update(safetensors.load_file(str(f)))
    fresh = block_llama(seed=1)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)  # (tied to the embedding)
    ids = torch.randint(0, 128, (1, 9))
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
