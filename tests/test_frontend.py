import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

from svlib.config import ConfigError, from_dict
from svlib.model import frontend as fe
from svlib.model.frontend import (
    PRESETS,
    EncoderError,
    Frontend,
    FrontendConfig,
    WeightsMismatchError,
    add_lora,
    build_encoder,
    build_frontend,
    count_parameters,
    freeze,
    load_encoder,
    merge_lora,
    save_encoder,
)

torch.set_num_threads(2)

FULL_ENCODER_PARAMS = 580_492_096  # arXiv 2510.04213, without masked_spec_embed
FULL_LORA_PARAMS = 24 * 2 * (1024 * 64 + 64 * 1024)  # r=64 on linear_q and linear_v of 24 layers


def tiny_frontend(seed=0):
    torch.manual_seed(seed)
    return Frontend(build_encoder("tiny")).eval()


def padded_batch(lengths, dim=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    frames = max(lengths)
    feats = torch.randn(len(lengths), frames, dim, generator=g)
    mask = torch.zeros(len(lengths), frames, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        feats[i, n:] = 1e3  # loud garbage in the padding: must not reach the real frames
    return feats, mask


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_preset_sizes():
    with torch.device("meta"):
        full = build_encoder("w2v-bert-2.0")
        small = build_encoder("small")
        tiny = build_encoder("tiny")
    assert count_parameters(full) == FULL_ENCODER_PARAMS
    assert not hasattr(full, "masked_spec_embed")
    assert full.config.layerdrop == 0.0 and full.config.mask_time_prob == 0.0
    assert (full.config.num_hidden_layers, full.config.hidden_size) == (24, 1024)
    assert count_parameters(small) == 2_339_712
    assert count_parameters(tiny) == 41_920
    assert small.config.conv_depthwise_kernel_size == 31


def test_encoder_overrides_size_a_preset_and_survive_a_save(tmp_path):
    cfg = from_dict(FrontendConfig, {"preset": "small", "encoder": {"num_hidden_layers": 4, "hidden_size": 96,
                                                                     "intermediate_size": 384,
                                                                     "output_hidden_size": 96}})
    frontend = build_frontend(cfg)
    assert (frontend.encoder.config.num_hidden_layers, frontend.encoder.config.hidden_size) == (4, 96)
    assert frontend.encoder.config.layerdrop == 0.0  # the forced settings still apply
    # per layer 4 h^2 + 4 h (attention) + 2 (2 h f + f + h) (two FFNs) + conv + norms; checked by HF's own count
    assert count_parameters(frontend) == count_parameters(Wav2Vec2BertModel(cfg.encoder_config())) == 892_544
    save_encoder(frontend.encoder, tmp_path / "enc")
    assert load_encoder(tmp_path / "enc").config.num_hidden_layers == 4  # downstream stages read the folder
    with pytest.raises(ConfigError, match=r"unknown Wav2Vec2BertConfig field\(s\) \['hidden_sise'\]"):
        FrontendConfig(preset="small", encoder={"hidden_sise": 96})
    with pytest.raises(ConfigError, match="apply to a preset only"):
        FrontendConfig(folder="pretrained/x", encoder={"num_hidden_layers": 2})


def test_hidden_states_of_padded_batch_match_single_utterances():
    frontend = tiny_frontend()
    lengths = [37, 20, 5]
    feats, mask = padded_batch(lengths)
    with torch.no_grad():
        states = frontend(feats, mask)
        assert len(states) == frontend.num_states == 3
        assert all(s.shape == (3, 37, 32) for s in states)
        for i, n in enumerate(lengths):
            alone = frontend(feats[i : i + 1, :n], mask[i : i + 1, :n])
            unmasked = frontend(feats[i : i + 1, :n])
            for s, a, u in zip(states, alone, unmasked):
                assert max_diff(s[i, :n], a[0]) < 1e-5
                assert max_diff(a, u) < 1e-6  # a full mask is the same as no mask
    # the first state is the feature projection output
    with torch.no_grad():
        proj = frontend.encoder.feature_projection(feats)[0]
    assert max_diff(states[0][mask.bool()], proj[mask.bool()]) < 1e-6


def test_bad_inputs():
    frontend = tiny_frontend()
    with pytest.raises(ValueError, match="160"):
        frontend(torch.zeros(2, 10, 80))
    with pytest.raises(ValueError, match="attention_mask"):
        frontend(torch.zeros(2, 10, 160), torch.ones(2, 9))


def test_pretrained_folder_with_specaugment_and_layerdrop(tmp_path):
    # A folder as facebook/w2v-bert-2.0 ships it: SpecAugment on (masked_spec_embed in the weights),
    # layerdrop 0.1, extra keys from other tools.
    torch.manual_seed(3)
    config = Wav2Vec2BertConfig(**PRESETS["tiny"], mask_time_prob=0.05, layerdrop=0.1)
    stock = Wav2Vec2BertModel(config).eval()
    assert hasattr(stock, "masked_spec_embed")
    stock.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["per_layer_intermediate_size"] = [64, 64]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert "masked_spec_embed" in load_file(str(tmp_path / "model.safetensors"))

    encoder = load_encoder(tmp_path)
    assert not hasattr(encoder, "masked_spec_embed")
    assert encoder.config.layerdrop == 0.0 and encoder.config.mask_time_prob == 0.0
    assert encoder.config.per_layer_intermediate_size == [64, 64]
    frontend = Frontend(encoder).train()  # layerdrop would skip layers in training mode
    feats, mask = padded_batch([12, 12])
    with torch.no_grad():
        ours = Frontend(encoder).eval()(feats, mask)
        theirs = stock(feats, mask, output_hidden_states=True).hidden_states
        train_states = frontend(feats, mask)
    assert len(train_states) == 3
    for a, b in zip(ours, theirs):
        assert max_diff(a, b) == 0.0


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    encoder = build_encoder("tiny").eval()
    encoder.save_pretrained(tmp_path / "hf")
    loaded = load_encoder(tmp_path / "hf")
    save_encoder(loaded, tmp_path / "ours")
    reloaded = Wav2Vec2BertModel.from_pretrained(tmp_path / "ours").eval()
    feats, mask = padded_batch([9, 6])
    with torch.no_grad():
        a = encoder(feats, mask, output_hidden_states=True).hidden_states
        b = Frontend(loaded).eval()(feats, mask)
        c = reloaded(feats, mask, output_hidden_states=True).hidden_states
    for x, y, z in zip(a, b, c):
        assert max_diff(x, y) == 0.0 and max_diff(x, z) == 0.0
    assert build_encoder(str(tmp_path / "ours")).config.hidden_size == 32


def test_encoder_hook_runs_before_weights_load(tmp_path, monkeypatch):
    seen = []

    def hook(encoder):
        seen.append(encoder.config.num_hidden_layers)
        # a pruning-like edit: drop the last layer when the config asks for it
        if getattr(encoder.config, "keep_layers", None) is not None:
            encoder.encoder.layers = encoder.encoder.layers[: encoder.config.keep_layers]

    monkeypatch.setattr(fe, "_ENCODER_HOOKS", [])
    fe.register_encoder_hook(hook)
    full = build_encoder("tiny")
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.1.")}
    config = full.config.to_dict()
    config["keep_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"))
    shrunk = load_encoder(tmp_path)
    assert seen == [2, 2] and len(shrunk.encoder.layers) == 1


def test_load_encoder_errors(tmp_path):
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderError, match="wav2vec2-bert"):
        load_encoder(tmp_path / "bert")

    encoder = build_encoder("tiny")
    encoder.save_pretrained(tmp_path / "bad")
    state = load_file(str(tmp_path / "bad" / "model.safetensors"))
    del state["encoder.layers.0.ffn1.intermediate_dense.weight"]
    state["encoder.layers.0.ffn1.output_dense.bias"] = torch.zeros(7)
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(WeightsMismatchError) as err:
        load_encoder(tmp_path / "bad")
    msg = str(err.value)
    assert "missing keys (1): encoder.layers.0.ffn1.intermediate_dense.weight" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "encoder.layers.0.ffn1.output_dense.bias: model (32,) vs checkpoint (7,)" in msg


def lora_frontend(seed=0):
    frontend = tiny_frontend(seed)
    add_lora(frontend, r=4, alpha=8.0, dropout=0.0, targets=["linear_q", "linear_v"])
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in frontend.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters matter
                p.normal_(0, 0.2)
    return frontend.eval()


def test_lora_merge_gives_same_outputs():
    frontend = lora_frontend()
    assert frontend.has_lora
    feats, mask = padded_batch([15, 11])
    merged = merge_lora(frontend).eval()
    assert type(merged.encoder) is Wav2Vec2BertModel and not merged.has_lora
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    assert set(merged.encoder.state_dict()) == set(build_encoder("tiny").state_dict())
    assert frontend.has_lora  # the input is left as it was
    with torch.no_grad():
        plain = tiny_frontend()(feats, mask)
        lora_out = frontend(feats, mask)
        merged_out = merged(feats, mask)
    assert max(max_diff(a, b) for a, b in zip(lora_out[1:], plain[1:])) > 1e-2  # LoRA changes the output
    for a, b in zip(lora_out, merged_out):
        assert max_diff(a[mask.bool()], b[mask.bool()]) <= 1e-5


def test_lora_errors():
    frontend = tiny_frontend()
    with pytest.raises(ValueError, match="no module named"):
        add_lora(frontend, targets=["q_proj"])
    add_lora(frontend, r=2, alpha=4.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(frontend, r=2, alpha=4.0)


def test_freeze_keeps_only_lora_trainable_and_frozen_parts_in_eval():
    cfg = from_dict(FrontendConfig, {"preset": "tiny", "lora": {"r": 4, "alpha": 8}, "freeze": True})
    frontend = build_frontend(cfg).train()
    trainable = [n for n, p in frontend.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert count_parameters(frontend, trainable_only=True) == 2 * 2 * (32 * 4 + 4 * 32)
    layer = frontend.encoder.encoder.layers[0]
    assert not layer.conv_module.training and not layer.ffn1.training  # no conv dropout when frozen
    assert layer.self_attn.linear_q.training and layer.self_attn.linear_q.lora_dropout.training
    freeze(frontend, False)
    assert all(p.requires_grad for p in frontend.parameters()) and layer.conv_module.training

    with torch.device("meta"):
        full = build_frontend(FrontendConfig(preset="w2v-bert-2.0", lora=fe.LoraConfig(), freeze=True))
    assert count_parameters(full, trainable_only=True) == FULL_LORA_PARAMS == 6_291_456
    assert count_parameters(full) == FULL_ENCODER_PARAMS + FULL_LORA_PARAMS


def test_frontend_config_validation():
    with pytest.raises(ConfigError, match="exactly one"):
        FrontendConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        FrontendConfig(preset="tiny", folder="models/x")
    with pytest.raises(ConfigError, match="unknown preset"):
        FrontendConfig(preset="huge")
    with pytest.raises(ConfigError, match="absolute"):
        FrontendConfig(folder="/models/w2v-bert-2.0")
    with pytest.raises(ConfigError, match="lora.r"):
        from_dict(FrontendConfig, {"preset": "tiny", "lora": {"r": 0}})
    cfg = from_dict(FrontendConfig, {"folder": "pretrained/w2v-bert-2.0", "lora": {"r": 8, "alpha": 16}})
    assert cfg.lora.target_modules == ["linear_q", "linear_v"]


def test_build_frontend_from_relative_folder(tmp_path):
    build_encoder("tiny").save_pretrained(tmp_path / "models" / "enc")
    frontend = build_frontend(FrontendConfig(folder="models/enc"), root=tmp_path)
    assert frontend.num_states == 3 and frontend.hidden_size == 32
