"""DeepSeek's release format through ``load_backbone``: a V4-Flash miniature (``tests/official_checkpoint.py``) loads,
equals its dequantized twin weight for weight and logit for logit, decodes like transformers' own generate, labels,
and is placed by device maps; bad inputs are refused with one line before any weight is read.

The oracles: the release format's definition (e4m3 / e2m1 / UE8M0 bit layouts, decoded here in numpy from the raw
safetensors bytes), the unquantized twin loaded through transformers' plain path, and transformers' ``generate``.
"""

import json
import os
import re

import numpy as np
import pytest
import torch

from indexer_train.build_labels import LabelParams, build_labels
from indexer_train.shards import LabelShards
from lsa_runtime import backbone, placement
from lsa_runtime.backbone import BackboneError, load_backbone
from lsa_runtime.placement import checkpoint_weights, parse_device_map
from lsa_runtime.session import Session
from tests.official_checkpoint import write_official_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = 300  # 2 sliding windows, 75 CSA entries (> index_topk 32), 2 HCA entries
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return write_official_checkpoint(tmp_path_factory.mktemp("v4flash-mini"))


@pytest.fixture(scope="module")
def official(mini):
    return load_backbone(mini.official)[0]


@pytest.fixture(scope="module")
def reference(mini):
    return load_backbone(mini.reference)[0]


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(3, 1024, (PROMPT,), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0]


# ---- the release format, read from the bytes ------------------------------------------------------------------

def _raw_tensors(directory):
    """name -> (safetensors dtype, shape, raw uint8 array), straight from the files' headers and bytes."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        blob = path.read_bytes()
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                data = np.frombuffer(blob, np.uint8, end - start, 8 + size + start)
                out[name] = (entry["dtype"], entry["shape"], data)
    return out


def _e4m3(b):
    """OCP FP8 E4M3: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal."""
    b = b.astype(np.int64)
    sign, exp, man = np.where(b >> 7, -1.0, 1.0), (b >> 3) & 0xF, b & 0x7
    assert not np.any((exp == 0xF) & (man == 0x7)), "NaN in an e4m3 weight"
    return sign * np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))


def _e2m1(nibble):
    """OCP FP4 E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (0 or 0.5)."""
    n = nibble.astype(np.int64)
    sign, exp, man = np.where(n >> 3, -1.0, 1.0), (n >> 1) & 0x3, n & 0x1
    return sign * np.where(exp == 0, man * 0.5, (1 + man / 2) * 2.0 ** (exp - 1))


def _ue8m0(b):
    """UE8M0: an unsigned 8-bit exponent, bias 127, no mantissa: the scale is a power of two."""
    assert not np.any(b == 0xFF), "NaN scale"
    return 2.0 ** (b.astype(np.int64) - 127)


def _dequantize(weight, scale):
    (w_dtype, w_shape, w_raw), (s_dtype, s_shape, s_raw) = weight, scale
    assert s_dtype == "F8_E8M0"
    s = _ue8m0(s_raw).reshape(s_shape)
    if w_dtype == "F8_E4M3":  # 128 x 128 blocks
        rows, cols = w_shape
        full = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:rows, :cols]
        return _e4m3(w_raw).reshape(rows, cols) * full
    assert w_dtype == "I8"  # FP4: element 2j in the low nibble, 2j+1 in the high one; one scale per 32 inputs
    rows, half = w_shape
    codes = np.stack([w_raw & 0xF, w_raw >> 4], axis=-1).reshape(rows, 2 * half)
    return _e2m1(codes) * np.repeat(s, 32, axis=1)


# DeepSeek's quantized tensors -> transformers' parameters (the correspondence the release format defines)
_ATTN = {"attn.wq_a": "self_attn.q_a_proj", "attn.wq_b": "self_attn.q_b_proj", "attn.wkv": "self_attn.kv_proj",
         "attn.wo_a": "self_attn.o_a_proj", "attn.wo_b": "self_attn.o_b_proj",
         "attn.indexer.wq_b": "self_attn.compressor.indexer.q_b_proj", "ffn.shared_experts.w1":
         "mlp.shared_experts.gate_proj", "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
         "ffn.shared_experts.w3": "mlp.shared_experts.up_proj"}


def _loaded_value(params, name, inter):
    layer, rest = name.removeprefix("layers.").removesuffix(".weight").split(".", 1)
    prefix = f"model.layers.{layer}."
    if rest.startswith("ffn.experts."):
        expert, proj = rest.removeprefix("ffn.experts.").split(".")
        if proj == "w2":
            return params[prefix + "mlp.experts.down_proj"][int(expert)]
        gate_up = params[prefix + "mlp.experts.gate_up_proj"][int(expert)]
        return gate_up[:inter] if proj == "w1" else gate_up[inter:]
    return params[prefix + _ATTN[rest] + ".weight"]


def test_miniature_is_in_the_release_format(mini):
    raw = _raw_tensors(mini.official)
    cfg = json.loads((mini.official / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    assert cfg["expert_dtype"] == "fp4" and cfg["compress_ratios"] == [0, 0, 4, 128, 4, 0]
    assert "layer_types" not in cfg and "mlp_layer_types" not in cfg
    expect = {
        "layers.2.attn.wq_b.weight": ("F8_E4M3", [8 * 512, 1024]), "layers.2.attn.wq_b.scale": ("F8_E8M0", [32, 8]),
        "layers.2.attn.indexer.wq_b.weight": ("F8_E4M3", [64 * 128, 1024]),
        "layers.2.attn.indexer.wq_b.scale": ("F8_E8M0", [64, 8]),
        "layers.2.attn.wo_a.weight": ("F8_E4M3", [8 * 1024, 512]),
        "layers.0.ffn.experts.7.w1.weight": ("I8", [256, 128]),
        "layers.0.ffn.experts.7.w1.scale": ("F8_E8M0", [256, 8]),
        "layers.4.ffn.shared_experts.w2.scale": ("F8_E8M0", [2, 2]),
        "layers.2.attn.compressor.wkv.weight": ("BF16", [1024, 256]),
        "layers.2.attn.compressor.ape": ("F32", [4, 1024]),
        "layers.3.attn.compressor.ape": ("F32", [128, 512]), "layers.2.attn.indexer.compressor.wgate.weight":
        ("BF16", [256, 256]), "layers.2.attn.indexer.weights_proj.weight": ("BF16", [64, 256]),
        "layers.1.ffn.gate.tid2eid": ("I32", [1024, 2]), "layers.3.ffn.gate.bias": ("F32", [8]),
        "layers.0.hc_attn_fn": ("F32", [24, 1024]), "layers.0.attn.attn_sink": ("F32", [8]),
        "embed.weight": ("BF16", [1024, 256]), "head.weight": ("BF16", [1024, 256]), "hc_head_fn": ("F32", [4, 1024]),
        "mtp.0.e_proj.weight": ("F8_E4M3", [256, 256]),
    }
    for name, (dtype, shape) in expect.items():
        assert raw[name][:2] == (dtype, shape), name
    assert "layers.0.attn.indexer.wq_b.weight" not in raw and "layers.3.attn.indexer.wq_b.weight" not in raw
    assert "layers.0.attn.compressor.ape" not in raw  # sliding layers have no compressor
    config = backbone.load_config(mini.official)  # the layout comes from compress_ratios
    assert config.layer_types == ["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                  "heavily_compressed_attention", "compressed_sparse_attention"]
    assert config.mlp_layer_types == ["hash_moe"] * 3 + ["moe"] * 2
    assert (config.head_dim, config.index_head_dim, config.q_lora_rank, config.qk_rope_head_dim) == (512, 128, 1024, 64)
    assert config.rope_parameters["compress"]["rope_type"] == "yarn"


def test_loaded_weights_equal_the_format_definition_and_the_twin(mini, official, reference):
    """Every FP8/FP4 tensor, decoded here from its bytes, is the loaded parameter exactly; and every parameter and
    buffer of the loaded release checkpoint equals the unquantized twin's (norms, hc, sinks, ape, tid2eid too)."""
    raw = _raw_tensors(mini.official)
    params = official.state_dict()
    quantized = [n for n in raw if n.endswith(".weight") and n.removesuffix(".weight") + ".scale" in raw
                 and not n.startswith("mtp.")]
    assert len(quantized) == 5 * (8 + 8 * 3) + 2  # per layer: 5 attention + 3 shared; 8 experts x 3; 2 indexers
    for name in quantized:
        want = _dequantize(raw[name], raw[name.removesuffix(".weight") + ".scale"])
        got = _loaded_value(params, name, mini.config["moe_intermediate_size"])
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want), name
    twin = reference.state_dict()
    assert set(params) == set(twin)
    different = [k for k in params if not torch.equal(params[k], twin[k])]
    assert not different, different[:5]


def test_logits_equal_the_dequantized_model(official, reference, prompt_ids):
    """Tolerance 0: UE8M0 scales are powers of two, so e4m3 and e2m1 values times their scale are exact in bf16 and
    fp32; both models then hold bit-identical weights in the same transformers modules and compute the same
    arithmetic. Any difference would be a loading error, not rounding."""
    got, want = _logits(official, prompt_ids), _logits(reference, prompt_ids)
    assert float((got - want).abs().max()) == 0.0
    assert float(want.std()) > 0.1 and len(set(want.argmax(-1).tolist())) > 10  # a model that discriminates


def test_bfloat16_load_dequantizes_straight_to_bfloat16(mini, reference, prompt_ids, capsys):
    model, _ = load_backbone(mini.official, dtype="bfloat16")
    assert "dequantized to bfloat16 while loading: there are no FP8/FP4 kernels on CPU" in capsys.readouterr().err
    assert model.model.layers[2].self_attn.q_b_proj.weight.dtype == torch.bfloat16
    twin, _ = load_backbone(mini.reference, dtype="bfloat16")
    assert _float_dtypes(model) == _float_dtypes(twin)  # fp32 norms, hc, sinks, biases (keep-in-fp32); bf16 else
    ids = prompt_ids[:64]
    assert torch.equal(_logits(model, ids), _logits(twin, ids))  # same bf16 weights, same arithmetic


def _float_dtypes(model):
    return {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point()}


# transformers' names of the tensors the release stores in BF16 (the module docstring of official_checkpoint.py)
_STORED_BF16 = re.compile(r"(embed_tokens|lm_head|norm|mlp\.gate|weights_proj|compressor\.(indexer\.)?(kv|gate)_proj)"
                          r"\.weight$")


def test_release_tensors_get_the_dtypes_of_the_unquantized_load(mini, reference):
    """transformers 5.17 loads every renamed tensor of a pre-quantized checkpoint in its stored dtype, so the release's
    BF16 tensors stayed bfloat16 in a float32 model (and its first projection failed on mixed dtypes). That state is
    recreated here on whichever transformers runs the test; ``match_unquantized_dtypes`` must give back exactly the
    twin's tensors (an exact cast: the values are bf16 numbers), and change nothing on a second call."""
    model, _ = load_backbone(mini.official)
    params = dict(model.named_parameters())
    stored_bf16 = [name for name in params if _STORED_BF16.search(name)]
    headers = placement.read_safetensors_headers(mini.official)
    assert len(stored_bf16) == sum(e["dtype"] == "BF16" for n, e in headers.items() if not n.startswith("mtp."))
    for name in stored_bf16:
        params[name].data = params[name].data.to(torch.bfloat16)
    assert backbone.match_unquantized_dtypes(model, torch.float32) == len(stored_bf16)
    got, twin = model.state_dict(), reference.state_dict()
    assert _float_dtypes(model) == _float_dtypes(reference)
    assert all(torch.equal(got[k], twin[k]) for k in twin)
    assert backbone.match_unquantized_dtypes(model, torch.float32) == 0


def test_session_full_mode_equals_transformers_generate(official, prompt_ids):
    hf = official.generate(prompt_ids.unsqueeze(0), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT:].tolist()
    out = Session(official, tokenizer=None, mode="full", chunk_size=128).generate(prompt_ids, max_new_tokens=NEW_TOKENS)
    assert len(hf) == NEW_TOKENS and out.token_ids == hf


def test_build_labels_runs_on_the_release_checkpoint(mini, tmp_path):
    pytest.importorskip("datasets")  # the label shards are read back through datasets (absent on the GPU image)
    gen = torch.Generator().manual_seed(3)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "input_ids": torch.randint(3, 1024, (n,), generator=gen)
                                          .tolist()}) + "\n" for i, n in enumerate([160, 20])))
    params = LabelParams(layers=(2, 4), tau=16, nucleus=0.6, min_votes=2, chunk_size=64)
    summary = build_labels(str(mini.official), corpus, tmp_path / "labels", params)
    assert summary["documents"] == 1 and summary["skipped"] == 1
    shards = LabelShards(tmp_path / "labels")
    rows = shards.rows()
    assert len(rows) == (160 // 16 - 1) * 2 and sorted(set(rows["layer"])) == [2, 4]
    assert shards.keys(0, 2).shape == (160 // 4, 128)  # K^IComp at the release's index_head_dim
    assert all(all(p < r["n_visible"] for p in r["positives"]) for r in rows)
    assert any(len(r["positives"]) for r in rows)


# ---- placement ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_map", [
    "cpu",
    {"": "cpu"},
    "cpu:0-2,cpu:3-4",
    {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.layers.4": torch.device("cpu"), "model.norm": "cpu",
     "model.hc_head": "cpu", "lm_head": "cpu"},
    "auto",
])
def test_device_maps_load_the_same_model(mini, reference, prompt_ids, device_map):
    """Same weights, same arithmetic: exact ("auto" on a GPU machine loads both on the GPU, in bf16)."""
    model, _ = load_backbone(mini.official, device_map=device_map)
    ids = prompt_ids[:64]
    device = placement.execution_device(model.model.embed_tokens)
    if device.type != "cpu":  # the twin loaded the same way: same device, same dtype (bf16 on a GPU)
        reference, _ = load_backbone(mini.reference, device_map=device_map)
    assert torch.equal(_logits(model, ids.to(device)), _logits(reference, ids.to(device)))


def test_layer_ranges_put_the_ends_with_the_first_and_last_layer(mini):
    config = backbone.load_config(mini.official)
    placed = parse_device_map("cpu:0-1, cpu:2-4", config)
    assert list(placed) == ["model.embed_tokens", "model.rotary_emb", *(f"model.layers.{i}" for i in range(5)),
                            "model.norm", "model.hc_head", "lm_head"]
    assert set(placed.values()) == {"cpu"}


def test_flash_layer_ranges_on_two_gpus(monkeypatch):
    """The 43-layer Flash split over two (simulated) GPUs: only the map is parsed, nothing is loaded."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    flash = SimpleNamespace(num_hidden_layers=43)
    placed = parse_device_map("0:0-21,1:22-42", flash)
    assert [placed[f"model.layers.{i}"] for i in (0, 21, 22, 42)] == [0, 0, 1, 1]
    ends = ("model.embed_tokens", "model.norm", "model.hc_head", "lm_head")
    assert [placed[unit] for unit in ends] == [0, 1, 1, 1]
    assert parse_device_map("cuda:1", flash)["model.layers.7"] == 1
    with pytest.raises(BackboneError, match="device map leaves layer 22 nowhere"):
        parse_device_map("0:0-21,1:23-42", flash)
    with pytest.raises(BackboneError, match=r"cuda:2 does not exist \(this machine has 2 CUDA device\(s\)"):
        parse_device_map("0:0-21,2:22-42", flash)


def test_size_estimate_from_headers_is_the_loaded_size(mini, official):
    """Headers only: the fp32 estimate equals the bytes of the loaded parameters and persistent buffers."""
    estimate = sum(w.nbytes(4, quantized=False) for w in checkpoint_weights(mini.official).values())
    loaded = sum(t.numel() * t.element_size() for t in official.state_dict().values())
    assert estimate == loaded


# ---- refusals -----------------------------------------------------------------------------------------------

@pytest.fixture
def no_weight_read(monkeypatch):
    """Any attempt to load weights fails the test: refusals must come first."""
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were read before the input was refused")

    monkeypatch.setattr(transformers.DeepseekV4ForCausalLM, "from_pretrained", forbidden)


def _variant(mini, tmp_path, name, **changes):
    """The miniature with an edited config.json; the weight files are symlinks (never rewritten)."""
    target = tmp_path / name
    target.mkdir()
    for path in mini.official.iterdir():
        if path.name != "config.json":
            os.symlink(path, target / path.name)
    cfg = json.loads((mini.official / "config.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    (target / "config.json").write_text(json.dumps(cfg))
    return target


@pytest.mark.parametrize("device_map,message", [
    ("cpu:0-2", "device map leaves layers 3-4 nowhere"),
    ("cpu:0-1,cpu:3", "device map leaves layers 2, 4 nowhere"),
    ("cpu:0-2,cpu:2-4", "device map places layer 2 twice"),
    ("cpu:0-9", "layer 5 does not exist (the model has 5 layers, 0 to 4)"),
    ("99:0-4", "cuda:99 does not exist"),
    ("cuda:99", "cuda:99 does not exist"),
    ("gpu0", "is not DEVICE:FIRST-LAST"),
    ({"model.layers": "cpu", "lm_head": "cpu"}, "leaves model.embed_tokens, model.rotary_emb, model.norm, "
                                                "model.hc_head nowhere"),
    ({"": "cpu", "model.layers.3.mlp": "cpu"}, "splits model.layers.3"),
    ({"": "cpu", "model.decoder": "cpu"}, "'model.decoder' is no module of this model"),
    ({"": "disk"}, "'disk' offloading is not supported"),
    ({"": "tpu"}, "'tpu' is not a device"),
    (["cpu"], "is not one of"),
])
def test_bad_device_maps_are_refused_first(mini, no_weight_read, device_map, message):
    with pytest.raises(BackboneError) as caught:
        load_backbone(mini.official, device_map=device_map)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_dtype_larger_than_the_host_is_refused_with_the_numbers(mini, no_weight_read, monkeypatch, capsys):
    units = checkpoint_weights(mini.official).values()
    fp32, bf16 = (sum(w.nbytes(size, quantized=False) for w in units) for size in (4, 2))
    monkeypatch.setattr(placement, "host_memory_bytes", lambda: bf16)
    with pytest.raises(BackboneError) as caught:
        load_backbone(mini.official)  # float32: the CPU default
    assert capsys.readouterr().err == ""  # refused before announcing a dequantization that does not happen
    text = str(caught.value)
    assert text.endswith(f"in float32 needs about {fp32 / 1e9:,.1f} GB on the CPU, which has {bf16 / 1e9:,.1f} GB "
                         f"free; in bfloat16 the whole model needs about {bf16 / 1e9:,.1f} GB") and "\n" not in text
    with pytest.raises(AssertionError, match="weights were read"):  # bfloat16 fits: the load goes ahead
        load_backbone(mini.official, dtype="bfloat16")


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llama"}, "is a 'llama' model, not DeepSeek-V4"),
    ({"quantization_config": {"quant_method": "gptq"}}, "is quantized with 'gptq'"),
    ({"quantization_config": {"fmt": "e5m2"}}, "FP8 variant fm-index cannot load (fmt 'e5m2')"),
    ({"expert_dtype": "int4"}, "expert_dtype 'int4'"),
    ({"quantization_config": {"weight_block_size": [128]}}, "weight_block_size [128]"),
    ({"quantization_config": "fp8"}, "quantization_config is not an object"),
])
def test_unloadable_checkpoints_are_refused_first(mini, tmp_path, no_weight_read, changes, message):
    with pytest.raises(BackboneError) as caught:
        load_backbone(_variant(mini, tmp_path, "variant", **changes))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_quantized_only_is_refused_where_no_kernel_runs(mini, no_weight_read):
    with pytest.raises(BackboneError, match="cannot run quantized here: there are no FP8/FP4 kernels on CPU"):
        load_backbone(mini.official, dequantize=False)


def test_a_corrupt_header_is_refused_first(mini, tmp_path, no_weight_read):
    target = _variant(mini, tmp_path, "corrupt")
    shard = target / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(BackboneError, match="cannot read the safetensors header of"):
        load_backbone(target)


def test_native_init_reads_the_release_files_alone(mini, official, reference):
    """--init native without a backbone: the four native indexer tensors per memory layer read from the release's
    safetensors (FP8 dequantized with their UE8M0 block scales) give the towers that copying from the loaded model
    gives (both the release load and the unquantized twin)."""
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    config = MemoryIndexerConfig.from_backbone_config(reference.config, (2, 4), rank=2 * reference.config.q_lora_rank,
                                                      tau=16)  # a wider rank: the widening path too
    torch.manual_seed(0)
    from_files = MemoryIndexer.init_from_checkpoint(mini.official, config).state_dict()
    for model in (official, reference):
        torch.manual_seed(0)  # the widened part keeps the same random initialisation
        from_model = MemoryIndexer.init_from_native(model, config).state_dict()
        assert from_files.keys() == from_model.keys()
        assert all(torch.equal(from_files[k], from_model[k]) for k in from_model)
    with pytest.raises(BackboneError, match="not a CSA layer"):  # layer 3 is HCA: no indexer
        backbone.read_native_indexer(mini.official, [3])
