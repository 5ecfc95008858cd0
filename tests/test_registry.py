"""svlib.package: describe (params, MACs), model card, reference-checkpoint conversion, MLflow registry."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import svlib
from svlib import package
from svlib.model.attention import set_attention
from svlib.model.speaker import ModelFormatError, save_model

from test_speaker import tiny_model, waves_batch

MHFA = {"type": "mhfa", "adapter_dim": 8, "heads": 4, "embed_dim": 24}


def _flop_macs(fn) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("backend", [None, MHFA])
def test_describe_counts_match_modules(backend):
    model = tiny_model(backend=backend)
    # describe() reports the architecture's MACs, i.e. HF's stock relative_key forward (the lean one gives the
    # same output with fewer products: counting.count_macs(attention="lean")), so count the stock module
    set_attention(model.frontend.encoder, "stock")
    model.frontend.encoder.set_attn_implementation("eager")  # sdpa kernels are invisible to FlopCounterMode
    seconds, t = 3.0, 150
    info = package.describe(model, seconds=seconds)
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert info["params_encoder"] == sum(p.numel() for p in model.frontend.parameters())
    assert info["params_backend"] == sum(p.numel() for p in model.backend.parameters())
    assert info["pruned"] is False and info["layers"] == [{"heads": 2, "ffn1": 64, "ffn2": 64, "conv": 32}] * 2
    assert info["features_normalise"] == "utterance"
    assert package.describe(tiny_model(features={"normalise": "none"}))["features_normalise"] == "none"

    feats, mask = torch.randn(1, t, 160), torch.ones(1, t, dtype=torch.long)
    states = model.frontend(feats, mask)
    # every weight matmul, conv and attention product of the encoder, exactly
    assert info["macs_per_second_encoder"] * seconds == _flop_macs(lambda: model.frontend(feats, mask))
    # the back-end count adds the elementwise pooling products that FlopCounterMode does not see
    b = model.backend
    elementwise = (t * 3 * b.num_states * b.adapter_dim if backend is None else t * 2 * b.num_states * b.hidden_size)
    assert info["macs_per_second_backend"] * seconds - elementwise == _flop_macs(lambda: model.backend(states, mask))
    assert info["macs_per_second"] == pytest.approx(info["macs_per_second_encoder"] + info["macs_per_second_backend"])


def test_pruned_folder_round_trip_and_card(tmp_path):
    shrink = pytest.importorskip("svlib.pruning.shrink", reason="svlib.pruning.shrink not available")
    model = tiny_model(seed=2)
    shrink.shrink_encoder(model.frontend.encoder, [
        {"heads": torch.tensor([0.0, 1.0]), "ffn1": (torch.arange(64) % 2).float()},
        {"heads": torch.zeros(2), "conv": (torch.arange(32) < 8).float(), "ffn2": torch.zeros(64)},
    ])
    folder = save_model(model, tmp_path / "pruned", {"stage": "shrink"})
    loaded = svlib.load_model(folder)  # lazily exported, pruned-aware
    waves, lengths = waves_batch([16000, 9000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(waves, lengths), model(waves, lengths), rtol=0, atol=1e-6)
    info = package.describe(loaded)
    assert info["layers"] == [{"heads": 1, "ffn1": 32, "ffn2": 64, "conv": 32}, {"heads": 0, "ffn1": 64, "ffn2": 0, "conv": 8}]
    assert info["kept_fraction"] == {"heads": 0.25, "ffn1": 0.75, "ffn2": 0.5, "conv": 0.625}
    assert info["params_total"] == sum(p.numel() for p in loaded.parameters())
    dense = package.describe(tiny_model())
    assert info["macs_fraction_of_dense_encoder"] == pytest.approx(
        info["macs_per_second_encoder"] / dense["macs_per_second_encoder"])

    readme = package.write_model_card(folder, {**info, "training_data": ["sv-mini train (96 utterances)"],
                                               "eer": {"sv-mini test": 21.25}, "mindcf": {"sv-mini test": 0.875}})
    text = readme.read_text()
    assert f"| parameters (total) | {info['params_total']:,} |" in text
    assert "| 1 | 0/2 | 64/64 | 0/64 | 8/32 |" in text
    assert "| sv-mini test | 21.250 | 0.8750 |" in text and "- sv-mini train (96 utterances)" in text
    assert "No calibration yet" in text
    # a later update keeps earlier keys
    package.write_model_card(folder, {"notes": "second pass"})
    card = json.loads((folder / package.CARD_FILE).read_text())
    assert card["eer"] == {"sv-mini test": 21.25} and card["notes"] == "second pass"


def test_reference_checkpoint_conversion(tmp_path):
    model = tiny_model(seed=4)
    spk = {f"front.encoder.{k}": v for k, v in model.frontend.encoder.state_dict().items()}
    spk.update(model.backend.state_dict())
    pth = tmp_path / "model_lmft_0.14.pth"
    torch.save({"modules": {"spk_model": spk, "classifier": {"weight": torch.randn(7, 24)}}, "epoch_idx": 3}, pth)
    out = package.convert_reference_checkpoint(pth, "tiny", tmp_path / "converted")
    loaded = package.load_model(out)
    waves, lengths = waves_batch([12000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(waves, lengths), model(waves, lengths), rtol=0, atol=1e-6)
    assert loaded.meta["num_classes"] == 7 and loaded.meta["epoch_idx"] == 3
    assert "model_lmft_0.14.pth" in (out / "README.md").read_text()
    # an encoder folder works as the architecture too
    enc_dir = tmp_path / "enc"
    model.frontend.encoder.config.save_pretrained(enc_dir)
    out2 = package.convert_reference_checkpoint(pth, enc_dir, tmp_path / "converted2")
    assert json.loads((out2 / package.CARD_FILE).read_text())["params_total"] == sum(p.numel() for p in model.parameters())


def test_register_and_load_registered(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = tiny_model(seed=5)
    folder = save_model(model, tmp_path / "model", {"eer": 1.0})
    package.write_model_card(folder, package.describe(model))
    import mlflow

    before = mlflow.get_tracking_uri()
    assert package.register_model(folder, "tiny-sv", tracker_uri=uri) == 1
    assert package.register_model(folder, "tiny-sv", tracker_uri=uri) == 2
    assert mlflow.get_tracking_uri() == before  # the caller's global URI is untouched
    loaded = package.load_registered("models:/tiny-sv/2", tracker_uri=uri, dst=tmp_path / "dl")
    waves, lengths = waves_batch([10000])
    with torch.no_grad():
        torch.testing.assert_close(loaded(waves, lengths), model(waves, lengths), rtol=0, atol=0)
    assert (tmp_path / "artifacts" / package.REGISTRY_EXPERIMENT).is_dir()  # artifacts beside the database
    from mlflow.tracking import MlflowClient

    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("tiny-sv", "1")
    run = MlflowClient(tracking_uri=uri).get_run(version.run_id)
    assert run.data.metrics["params_total"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(package.PackageError, match="not found"):
        package.load_registered("models:/tiny-sv/9", tracker_uri=uri)
    with pytest.raises(ModelFormatError, match="no svlib_model.json"):
        package.register_model(tmp_path, "tiny-sv", tracker_uri=uri)
