"""`fm-index plan` / lsa_runtime.memory_plan against independent oracles.

* weights: ``sum(p.numel())`` and the bytes of transformers' own ``DeepseekV4ForCausalLM`` built on the meta device
  (for quantized configs with transformers' FP8 replacement applied, as ``from_pretrained`` does);
* KV state: ``Session.stats.device_bytes`` and the cold pool's bytes after real decoding on CPU (tiny in bf16, and a
  Flash-shaped model with V4-Flash's KV dimensions in fp32);
* a small case worked out by hand, and concurrency arithmetic by hand;
* bad input through the CLI: exit code 2, one line.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from lsa_runtime.backbone import load_backbone
from lsa_runtime.config import SessionConfig
from lsa_runtime.memory_plan import (
    FLASH_COMPRESS_RATIOS,
    Hardware,
    LSASettings,
    PlanError,
    SequenceState,
    WeightGroup,
    WeightPlan,
    concurrency,
    count_weights,
    flash_config,
    parse_contexts,
    parse_size,
    plan_memory,
    sequence_state,
)
from lsa_runtime.policies import ResidentPolicy
from lsa_runtime.session import Session

GiB = 2**30


# ---- weights: transformers' model on the meta device is the oracle -----------------------------------------


def small_flash_config(**quantization):
    """V4-Flash's layer schedule (43 layers, CSA 2..42, HCA 3..41) and KV dimensions (head_dim 512, index keys 128,
    window 128, rates 4 / 128), everything else shrunk; ``quantization``: a quantization_config."""
    from transformers import DeepseekV4Config

    extra = {"quantization_config": dict(quantization)} if quantization else {}
    return DeepseekV4Config(compress_ratios=FLASH_COMPRESS_RATIOS, hidden_size=64, num_attention_heads=2,
                            q_lora_rank=32, o_groups=1, o_lora_rank=32, index_n_heads=4, n_routed_experts=2,
                            num_experts_per_tok=1, moe_intermediate_size=96, vocab_size=256, hc_mult=2,
                            hc_sinkhorn_iters=2, max_position_embeddings=8192, dtype="bfloat16", **extra)


def meta_model_bytes(config) -> tuple[int, int, int]:
    """(parameters, parameter bytes, persistent buffer bytes) of transformers' model for ``config`` on the meta
    device, built in the config's dtype (fp32 modules stay fp32) and, for an FP8 config, with the FP8 modules
    transformers' quantizer puts in place before loading a pre-quantized checkpoint."""
    from transformers import DeepseekV4ForCausalLM
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    before = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, str(config.dtype).removeprefix("torch.")))
    try:
        with torch.device("meta"):
            model = DeepseekV4ForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    parameters = sum(p.numel() for p in model.parameters())
    quant = getattr(config, "quantization_config", None)
    if quant:
        options = {k: v for k, v in quant.items() if k not in ("quant_method", "fmt")}
        fp8 = FineGrainedFP8Config(**options)
        skip = FineGrainedFP8HfQuantizer.get_modules_to_not_convert(model, fp8.modules_to_not_convert,
                                                                     model._keep_in_fp32_modules)
        replace_with_fp8_linear(model, modules_to_not_convert=skip, quantization_config=fp8, pre_quantized=True)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent = model.state_dict()
    buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name in persistent)
    return parameters, nbytes, buffers


def configs():
    from transformers import AutoConfig

    from lsa_runtime.backbone import BUNDLED_MODELS

    return {
        "tiny": AutoConfig.from_pretrained(BUNDLED_MODELS["tiny"]),
        "reference": AutoConfig.from_pretrained(BUNDLED_MODELS["reference"]),
        "flash-shaped bf16": small_flash_config(),
        "flash-shaped fp8 + fp4 experts": small_flash_config(quant_method="fp8", weight_block_size=[128, 128],
                                                             scale_fmt="ue8m0", expert_dtype="fp4"),
        "flash-shaped fp8, float scales, static": small_flash_config(quant_method="fp8", weight_block_size=[32, 64],
                                                                     activation_scheme="static"),
        "V4-Flash (published config)": flash_config(),
    }


@pytest.mark.parametrize("name", list(configs()))
def test_weights_equal_the_transformers_model(name):
    config = configs()[name]
    weights = count_weights(config)
    assert (weights.parameters, weights.parameter_bytes, weights.buffer_bytes) == meta_model_bytes(config)


def test_v4_flash_weights_by_hand():
    """284.3B parameters; the routed experts (43 layers x 256 experts x gate/up/down of 4096 x 2048) are FP4: half a
    byte a weight + a 1-byte scale per 32 weights."""
    weights = count_weights(flash_config())
    assert weights.parameters == 284_332_230_231
    experts = next(g for g in weights.groups if g.name == "routed experts")
    assert experts.parameters == 43 * 256 * 3 * 4096 * 2048
    assert experts.bytes == experts.parameters // 2 + experts.parameters // 32
    assert weights.bytes == 155_997_933_020 + 18_657_280  # parameters (FP8/FP4 + scales) + buffers: 156.0 GB


# ---- per-sequence state: a Session's measured device bytes are the oracle ------------------------------------


class NewestEntries(ResidentPolicy):
    """Resident set = the ``count`` newest visible entries; needs the memory layers' keys like FlashMemory does."""

    name = "newest"

    def __init__(self, count: int, memory_layers):
        self.count, self.memory_layers = count, tuple(memory_layers)

    def select(self, state):
        return torch.arange(max(0, state.n_visible - self.count), state.n_visible)


def decode(model, mode_or_policy, prompt_tokens: int, new_tokens: int, tau: int, memory_keys: str = "device"):
    ids = torch.randint(3, model.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    config = SessionConfig(mode="full" if mode_or_policy == "full" else "lsa", tau=tau, chunk_size=256,
                           decode_graphs=False, memory_keys=memory_keys)
    policy = None if mode_or_policy == "full" else mode_or_policy
    session = Session(model, None, config, policy=policy)
    session.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
    return session


def assert_plan_matches(session, plan: SequenceState):
    stats = session.stats
    assert stats.context_tokens == plan.context
    measured = dict(stats.device_bytes)
    keys_measured = measured.pop("memory_index_keys")
    predicted = dict(plan.device_bytes)
    keys_predicted = predicted.pop("memory_index_keys")
    assert measured == predicted
    # the memory layers' keys grow amortised (a quarter at a time): the plan's slack bounds the unused rows
    assert keys_predicted <= keys_measured <= keys_predicted + plan.growth_slack
    if plan.mode == "lsa":
        assert session.cold_pool.used_bytes == plan.host_pool_bytes
        assert session.cold_pool.nbytes == plan.host_pool_allocated_bytes


@pytest.fixture(scope="module")
def tiny_bf16():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_backbone("tiny", dtype=torch.bfloat16)[0]  # as from_pretrained keeps it: norms, position_bias fp32
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flash_shaped_fp32():
    from transformers import DeepseekV4ForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield DeepseekV4ForCausalLM(small_flash_config()).eval()  # built in fp32, the default dtype
    torch.set_num_threads(before)


@pytest.mark.parametrize("memory_keys", ["device", "pool"])
def test_tiny_bf16_state_equals_session_bytes(tiny_bf16, memory_keys):
    """601 prompt + 16 decode forwards (the 16th fires a trigger) = 617 tokens: mid-window in CSA (617 % 4 = 1) and
    HCA (617 % 32 = 9); 40 resident entries, 3 memory layers."""
    config = tiny_bf16.config
    full = decode(tiny_bf16, "full", 601, 17, tau=16)
    assert_plan_matches(full, sequence_state(config, 617, "full", kv_dtype="bfloat16"))
    lsa = decode(tiny_bf16, NewestEntries(40, (6, 8, 10)), 601, 17, tau=16, memory_keys=memory_keys)
    settings = LSASettings(resident_fraction=0.0, keep_recent=40, memory_layers=3, memory_keys=memory_keys, tau=16)
    plan = sequence_state(config, 617, "lsa", settings, kv_dtype="bfloat16")
    assert_plan_matches(lsa, plan)
    assert plan.device_total < sequence_state(config, 617, "full", kv_dtype="bfloat16").device_total


def test_flash_shaped_state_equals_session_bytes(flash_shaped_fp32):
    """V4-Flash's KV layout (43 layers, head_dim 512, index keys 128, window 128, HCA rate 128) in fp32: 702 prompt
    + 16 decode forwards = 718 tokens (5 HCA entries + 78 open; 179 CSA entries + 2 open), 64 resident entries."""
    config = flash_shaped_fp32.config
    full = decode(flash_shaped_fp32, "full", 702, 17, tau=16)
    assert_plan_matches(full, sequence_state(config, 718, "full", kv_dtype="float32"))
    assert full.stats.full_bytes == sequence_state(config, 718, "full", kv_dtype="float32").device_bytes
    lsa = decode(flash_shaped_fp32, NewestEntries(64, (22, 26, 42)), 702, 17, tau=16)
    settings = LSASettings(resident_fraction=0.0, keep_recent=64, memory_layers=3, tau=16)
    assert_plan_matches(lsa, sequence_state(config, 718, "lsa", settings, kv_dtype="float32"))


def test_a_small_case_by_hand():
    """tiny (head_dim 64, index keys 32, window 32, rates 4 / 32; 2 sliding, 5 CSA, 5 HCA layers), bf16, 1,001
    tokens: 250 CSA entries, 31 HCA entries, 1 token open in CSA, 9 in HCA."""
    from transformers import AutoConfig

    from lsa_runtime.backbone import BUNDLED_MODELS

    config = AutoConfig.from_pretrained(BUNDLED_MODELS["tiny"])
    full = sequence_state(config, 1001, "full")
    assert full.device_bytes == {
        "window": (2 * 2 + 5 + 5) * 32 * 64 * 2,  # sliding layers keep K and V apart
        "pending": 5 * (1 * 2 * (64 + 32) * 2 * 2 + 4 * (64 + 32) * (2 + 4)) + 5 * 9 * 64 * 2 * 2,
        "hca": 5 * 31 * 64 * 2,
        "csa_kv": 5 * 250 * 64 * 2,
        "csa_index_keys": 5 * 250 * 32 * 2,
        "memory_index_keys": 0,
    }
    lsa = sequence_state(config, 1001, "lsa", LSASettings(resident_fraction=0.5, keep_recent=64, tau=16))
    selected = 64 + 93  # the tail + half of the 186 older entries
    rows = selected + 16 // 4 + 2
    assert lsa.resident_entries == selected
    assert lsa.device_bytes["csa_kv"] == 5 * rows * 64 * 2
    assert lsa.device_bytes["csa_index_keys"] == 5 * rows * 32 * 2
    assert lsa.device_bytes["memory_index_keys"] == 3 * 250 * 32 * 2
    assert lsa.growth_slack == 3 * 64 * 32 * 2
    assert lsa.transient_bytes == (5 - 3) * 250 * 32 * 2
    assert lsa.host_pool_bytes == 5 * 250 * (64 + 32) * 2
    assert lsa.host_pool_allocated_bytes == 5 * 251 * (64 + 32) * 2  # sized once for the 1,001 tokens


def test_concurrency_by_hand():
    weights = WeightPlan((WeightGroup("all", 1, 6 * GiB),), 0, "")
    state = SequenceState("lsa", 1000, 250, 100, {"csa_kv": GiB - 1024}, growth_slack=1024, transient_bytes=GiB // 2,
                          host_pool_bytes=GiB, host_pool_allocated_bytes=GiB)
    split = Hardware(gpus=2, gpu_memory=10 * GiB, reserve_bytes=GiB)  # room per GPU: 10 - 1 - 3 = 6 GiB
    capacity = concurrency(weights, state, split)
    assert (capacity.kv_room_bytes, capacity.gpu_sequences, capacity.host_sequences) == (12 * GiB, 11, None)
    replicated = Hardware(gpus=2, gpu_memory=10 * GiB, reserve_bytes=GiB, kv_placement="replicated",
                          host_memory=5 * GiB)
    capacity = concurrency(weights, state, replicated)
    assert (capacity.gpu_sequences, capacity.host_sequences, capacity.sequences) == (5, 5, 5)
    assert capacity.limit == "GPU memory"
    host_bound = Hardware(gpus=2, gpu_memory=10 * GiB, reserve_bytes=GiB, host_memory=4 * GiB)
    capacity = concurrency(weights, state, host_bound)
    assert (capacity.sequences, capacity.limit) == (4, "host memory (cold pool)")
    with pytest.raises(PlanError, match="weights do not fit"):
        concurrency(weights, state, Hardware(gpus=1, gpu_memory=6 * GiB))


def test_lsa_fits_more_sequences_than_full_on_eight_gpus():
    plan = plan_memory(flash_config(), parse_contexts("256K,1M"),
                       Hardware(gpus=8, gpu_memory=parse_size("96GB", "--gpu-memory"), kv_placement="replicated"))
    for full, lsa in plan.capacities:
        assert 0 < full.sequences < lsa.sequences
    assert plan.as_dict()["contexts"][0]["context"] == 256 * 1024


# ---- the command line -------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(app, ["plan", *[str(a) for a in args]])


def test_plan_prints_tables_and_json():
    result = run("--model", "tiny", "--context", "4K,16K", "--gpus", "2", "--gpu-memory", "1GiB")
    assert result.exit_code == 0, result.output
    assert "weights of tiny" in result.output and "concurrent sequences" in result.output
    result = run("--model", "tiny", "--context", "4K", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["weights"]["parameters"] == count_weights(configs()["tiny"]).parameters
    assert plan["contexts"][0]["full"]["device_bytes"]["csa_kv"] == 5 * 1024 * 64 * 2
    assert run("--help").exit_code == 0


@pytest.mark.parametrize("args, says", [
    (["--model", "NOT_DS_V4"], "not DeepSeek-V4"),
    (["--gpu-memory", "96"], "not a size"),
    (["--gpu-memory", "0GB"], "more than 0"),
    (["--context", "128Q"], "token count"),
    (["--model", "tiny", "--context", "1M"], "maximum"),
    (["--gpus", "1", "--gpu-memory", "139GiB"], "weights do not fit"),
    (["--gpus", "8"], "needs --gpu-memory"),
    (["--gpus", "0", "--gpu-memory", "96GB"], "--gpus"),
    (["--kv-dtype", "int8"], "--kv-dtype"),
    (["--resident-fraction", "1.5"], "--resident-fraction"),
    (["--reserve", "120%", "--gpu-memory", "96GB"], "--reserve"),
    (["--kv-placement", "pipeline", "--gpu-memory", "96GB", "--gpus", "8"], "--kv-placement"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, says):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    args = [str(tmp_path) if a == "NOT_DS_V4" else a for a in args]
    result = run(*args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], result.output


def test_fp8_pool_storage_matches_the_cold_pools_own_bytes():
    """The plan's host pool for pool_storage="fp8" equals what a ColdPool with that storage holds for the same
    entries (its rows and scales, counted by the pool itself)."""
    from lsa_runtime.backbone import csa_layers, load_config
    from lsa_runtime.cold_pool import ColdPool
    from lsa_runtime.memory_plan import LSASettings, sequence_state

    config = load_config("reference")
    context = 4096
    entries = context // config.compress_rates["compressed_sparse_attention"]
    pool = ColdPool(csa_layers(config), {"compressor": config.head_dim, "indexer": config.index_head_dim},
                    torch.bfloat16, storage="fp8")
    for layer in pool.layers:
        for name, width in pool.widths.items():
            pool.append(layer, name, torch.ones(entries, width))
    state = sequence_state(config, context, "lsa", LSASettings(pool_storage="fp8"))
    assert state.host_pool_bytes == pool.used_bytes
    model = sequence_state(config, context, "lsa", LSASettings())
    assert state.host_pool_bytes < 0.6 * model.host_pool_bytes


def test_the_plan_names_the_dequantized_size_of_a_quantized_checkpoint():
    """Where no FP8 kernel runs, the loader dequantizes: the plan says how large the weights then are (transformers'
    own model of the same config without quantization, on the meta device: the oracle above)."""
    from lsa_runtime.memory_plan import plan_memory

    config = small_flash_config(quant_method="fp8", weight_block_size=[128, 128], expert_dtype="fp4")
    plain = small_flash_config()
    _, parameter_bytes, buffer_bytes = meta_model_bytes(plain)
    assert plan_memory(config, [4096]).dequantized_bytes == parameter_bytes + buffer_bytes
    assert plan_memory(plain, [4096]).dequantized_bytes is None
