"""The memory plan: counts equal the built model's, every recipe fits the hardware it names with
10% headroom, and a run that cannot fit is refused naming the knobs that would make it fit."""

import pytest
import torch

from qvl_train.config import RECIPE_DIR, compose, to_config
from qvl_train.model import build_model, preset
from qvl_train.plan import check_plan, main, make_plan, model_config_for, parameter_counts
from qvl_train.train.optim import apply_freeze

from .model.reference import tiny_config

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_names_its_hardware_and_fits_it_with_10_percent_headroom(recipe):
    cfg = to_config(compose([f"+recipe={recipe}"]))
    assert cfg.plan.gpus and cfg.plan.gpu_mem_gib, f"{recipe} names no hardware (plan.gpus / plan.gpu_mem_gib)"
    plan = make_plan(cfg, model_config_for(cfg), world_size=cfg.plan.gpus, device="gpu", device_gib=cfg.plan.gpu_mem_gib)
    assert plan.headroom >= 0.10, plan.table()


@pytest.mark.parametrize("lora", [False, True])
def test_counts_equal_the_built_model_with_its_freeze_and_lora(lora):
    from qvl_train.peft import LoraSettings, apply_lora

    overrides = ["optim.freeze_vision=true"] + (["peft=lora", "peft.router=true"] if lora else [])
    cfg = to_config(compose(overrides))
    model_cfg = tiny_config(mlp_only_layers=[2])  # one dense layer among MoE layers: both layer kinds scale
    model = build_model(model_cfg)
    apply_freeze(model, cfg.optim)
    if lora:
        apply_lora(model, LoraSettings.from_section(cfg.peft))
    c = parameter_counts(model_cfg, cfg, persistence_threshold=10**4)
    params = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
                  or n.endswith(("base_layer.gate_up_proj", "base_layer.down_proj")))
    assert c.total == sum(p.numel() for p in params.values())
    assert c.trainable == sum(p.numel() for p in params.values() if p.requires_grad)
    assert c.expert_base == experts == 3 * model_cfg.text.num_experts * 3 * 64 * 48


def test_real_preset_counts_are_the_published_ones():
    cfg = to_config(compose(["+recipe=30b_a3b_full"]))
    c = parameter_counts(preset("30B-A3B"), cfg, persistence_threshold=10**4)
    assert c.total == c.trainable == 31_070_754_032
    assert c.expert_base == 48 * 603_979_776


def _cuda_device_of(monkeypatch, gib):
    import types

    from qvl_train import plan

    props = types.SimpleNamespace(total_memory=int(gib * plan.GIB))
    monkeypatch.setattr(plan.torch.cuda, "get_device_properties", lambda device: props)


ON_8_GPUS = dict(world_size=8, device=torch.device("cuda"), dtype=torch.bfloat16, ds_cfg={}, is_main=False)


def refusal_of_30b(monkeypatch, overrides: list[str], *, device_gib: float) -> str:
    """check_plan's ValueError for 30B-A3B on 8 GPUs of `device_gib` each with these overrides."""
    _cuda_device_of(monkeypatch, device_gib)
    with pytest.raises(ValueError) as err:
        check_plan(to_config(compose(overrides)), preset("30B-A3B"), **ON_8_GPUS)
    return str(err.value)


def test_a_run_that_cannot_fit_is_refused_naming_the_knobs_unless_told_to_run(monkeypatch):
    # 30B full SFT on 8 GPUs keeps the fp32 optimizer states on them: about 78 GiB each, over 64
    # (on CUDA the check takes the device's own total, whatever the recipe's target says)
    overrides = ["+recipe=30b_a3b_full", "parallel.offload_optimizer=false", "plan.gpu_mem_gib=200"]
    message = refusal_of_30b(monkeypatch, overrides, device_gib=64)
    assert "parallel.offload_optimizer=true" in message and "16 GPUs" in message and "plan.enforce=false" in message
    assert "\n  parallel.ep_size" not in message  # ep is 8 = world already: no bigger ep alone on 8 ranks
    relaxed = to_config(compose([*overrides, "plan.enforce=false"]))
    assert not check_plan(relaxed, preset("30B-A3B"), **ON_8_GPUS).fits


def test_lora_experts_per_gpu_follow_ep_and_the_cli_prints_the_plan(capsys):
    cfg = to_config(compose(["+recipe=235b_a22b_lora"]))
    slices = {}
    for ep in (8, 16):
        cfg.parallel.ep_size = ep
        plan = make_plan(cfg, preset("235B-A22B"), world_size=16, device="gpu", device_gib=80)
        slices[ep] = next(line.gib for line in plan.lines if line.name.startswith("EP expert slice"))
    assert slices[8] == pytest.approx(2 * slices[16]) and 50 < slices[8] < 56  # 227 B expert params / 8 in bf16
    main(["+recipe=30b_a3b_lora", "--gpus", "8", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    for term in ("weights", "gradients", "optimizer", "EP expert slice", "activations", "loss", "ZeRO-3 gathered",
                 "reduce bucket", "CUDA", "total vs device"):
        assert term in out, term


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cpu_plans_add_gloo_staging_and_a_frozen_embedding_is_not_kept_gathered(method):
    # tiny: stage3_max_live_parameters (1e9) exceeds the model, so the gathered term is the
    # ZeRO-3 parameters it may keep: all of them, less the token embedding when LoRA freezes it
    # 16 tokens: the backward transient stays below the largest gather, so the staging line is not 0
    cfg = to_config(compose([f"peft={'lora' if method == 'lora' else 'none'}", "parallel.ep_size=1",
                             "data.tokens_per_batch=16", "data.max_length=16"]))
    model_cfg = preset("tiny")
    lines = {}
    for device in ("cpu", "gpu"):
        plan = make_plan(cfg, model_cfg, world_size=2, device=device, device_gib=100, dtype=torch.float32)
        lines[device] = {line.name: line.gib * 2**30 / 4 for line in plan.lines}  # in fp32 elements
    c = parameter_counts(model_cfg, cfg, persistence_threshold=10**5)
    embedding = model_cfg.text.vocab_size * model_cfg.text.hidden_size
    kept = c.total - (embedding if method == "lora" else 0)
    assert lines["cpu"]["ZeRO-3 gathered params + prefetch"] == pytest.approx(kept)
    # the staging is freed before the gathered module computes: only what exceeds the transient
    staging = max(c.largest_module, c.moe_layer_experts) - lines["cpu"]["backward transient of one layer"]
    assert staging > 0 and lines["cpu"]["gloo all-gather staging (CPU)"] == pytest.approx(staging)
    assert "gloo all-gather staging (CPU)" not in lines["gpu"]  # NCCL gathers in place


def test_autoep_gathers_experts_only_over_more_than_one_rank_and_the_cpu_bucket_holds_one_groups_run():
    # full SFT on tiny (max_live 1e9 exceeds it): with AutoEP at ep = world each rank's expert
    # partition is the whole tensor, so only the non-expert parameters are gathered; over
    # world / ep = 2 ranks a rank's E / ep experts are too. On CPU the reduce bucket holds the
    # longer run of one partition group's gradients: the non-expert ones or a rank's experts.
    cfg = to_config(compose(["peft=none", "data.tokens_per_batch=16", "data.max_length=16"]))
    model_cfg = preset("tiny")
    c = parameter_counts(model_cfg, cfg, persistence_threshold=10**4)

    def lines(ep, world):
        cfg.parallel.ep_size = ep
        plan = make_plan(cfg, model_cfg, world_size=world, device="cpu", device_gib=100, dtype=torch.float32)
        return {line.name: line.gib * 2**30 / 4 for line in plan.lines}  # fp32 elements

    non_expert = c.total - c.expert_base
    assert lines(2, 2)["ZeRO-3 gathered params + prefetch"] == pytest.approx(non_expert)
    assert lines(2, 4)["ZeRO-3 gathered params + prefetch"] == pytest.approx(non_expert + c.expert_base / 2)
    assert lines(1, 2)["ZeRO-3 gathered params + prefetch"] == pytest.approx(c.total)
    assert lines(2, 2)["reduce bucket"] == pytest.approx(max(non_expert, c.expert_base / 2))
    assert lines(1, 2)["reduce bucket"] == pytest.approx(c.trainable)


def test_gib_key_old_name_and_the_device_total(monkeypatch):
    """plan.gpu_mem_gib is GiB; the old plan.gpu_mem_gb still reads as GiB with a warning; on
    CUDA the trainer's check uses the device's real total (an "80 GB" H100: 79.6 GiB), on CPU the key."""
    from qvl_train.plan import device_memory_gib

    with pytest.warns(FutureWarning, match="gpu_mem_gib"):
        cfg = to_config(compose(["+recipe=vqa", "plan.gpu_mem_gib=null", "plan.gpu_mem_gb=80"]))
    assert (cfg.plan.gpu_mem_gib, cfg.plan.gpu_mem_gb) == (80, None)
    with pytest.raises(ValueError, match="set only plan.gpu_mem_gib"):
        to_config(compose(["+recipe=vqa", "plan.gpu_mem_gb=80"]))
    _cuda_device_of(monkeypatch, 79.6)
    assert device_memory_gib(cfg, torch.device("cuda", 0), 8) == pytest.approx(79.6)
    assert device_memory_gib(cfg, torch.device("cpu"), 8) == 80


@pytest.mark.parametrize("recipe, min_tokens", [("30b_a3b_long_video", 131072), ("235b_a22b_long_video", 65536)])
def test_long_video_recipes_fit_only_with_sequence_parallelism(recipe, min_tokens):
    cfg = to_config(compose([f"+recipe={recipe}"]))
    p = cfg.parallel
    assert cfg.peft.method == "lora" and p.sp_size > 1 and cfg.data.max_length >= min_tokens
    assert cfg.plan.gpus % p.sp_size == 0 and 8 % p.sp_size == 0  # SP groups inside an 8-GPU node
    model_cfg = model_config_for(cfg)
    plan = make_plan(cfg, model_cfg, world_size=cfg.plan.gpus, device="gpu", device_gib=cfg.plan.gpu_mem_gib)
    assert plan.headroom >= 0.10, plan.table()
    assert any(line.name == "Ulysses all-to-all buffers" for line in plan.lines)
    p.sp_size = 1  # the same rows on one GPU each do not fit
    assert not make_plan(cfg, model_cfg, world_size=cfg.plan.gpus, device="gpu", device_gib=cfg.plan.gpu_mem_gib).fits


def test_the_backward_transient_of_one_layer_is_its_routed_rows_experts_gradients():
    # 30B-A3B (D 2048, expert I 768, top-8): T x 8 routed rows x (4 D + 7 I) elements, measured by
    # bench/bench_sp_memory.py; no supervised rows, so no loss chunk is freed before it
    T, b = 8192, 2
    cfg = to_config(compose(["+recipe=30b_a3b_lora", f"data.tokens_per_batch={T}", f"data.max_length={T}",
                             "plan.supervised_fraction=0"]))
    plan = {line.name: line.gib for line in make_plan(cfg, preset("30B-A3B"), world_size=8, device="gpu", device_gib=80).lines}
    assert plan["backward transient of one layer"] * 2**30 == pytest.approx(T * 8 * (4 * 2048 + 7 * 768) * b)
    with_loss = to_config(compose(["+recipe=30b_a3b_lora", f"data.tokens_per_batch={T}", f"data.max_length={T}"]))
    lines = {line.name: line.gib for line in make_plan(with_loss, preset("30B-A3B"), world_size=8, device="gpu", device_gib=80).lines}
    # the loss head's logits chunk is freed before the layers' backward: the line adds only the excess
    assert 0 < plan["backward transient of one layer"] - lines["backward transient of one layer"] < lines["loss (fused, chunked)"]


@pytest.mark.parametrize("sp, q_heads, kv_heads", [(4, 8, 1), (8, 4, 1), (2, 16, 2)])
def test_sp_plan_is_the_slice_plus_ulysses_buffers_with_replicated_kv_heads(sp, q_heads, kv_heads):
    # 30B-A3B: 32 query / 4 KV heads of 128; at sp 8 each rank gets 4 query heads and a copy of one KV head
    T, b = 65536, 2
    cfg = to_config(compose(["+recipe=30b_a3b_lora", f"data.tokens_per_batch={T}", f"data.max_length={T}",
                             f"parallel.sp_size={sp}"]))
    model_cfg = preset("30B-A3B")
    plan = {line.name: line.gib for line in make_plan(cfg, model_cfg, world_size=8, device="gpu", device_gib=80).lines}
    cfg.parallel.sp_size = 1
    cfg.data.tokens_per_batch = cfg.data.max_length = T // sp
    slice_plan = {line.name: line.gib for line in make_plan(cfg, model_cfg, world_size=8, device="gpu", device_gib=80).lines}
    staging = 2 * T * (2 * q_heads + 2 * kv_heads) * 128 + 2 * T / sp * cfg.plan.visual_fraction * 2048 * 4
    assert plan.pop("Ulysses all-to-all buffers") * 2**30 / b == pytest.approx(
        T * (2 * q_heads + 2 * kv_heads) * 128  # checkpointed: the recomputed layer's whole-row q, k, v, out
        + staging  # send/receive staging; merger + 3 DeepStack rows, sent and received
    )
    # the staging is freed before a layer's backward: the transient adds that much less than a slice's
    assert plan.pop("backward transient of one layer") == pytest.approx(
        slice_plan.pop("backward transient of one layer") - staging * b / 2**30)
    assert plan == slice_plan  # everything else: the plan of one slice of T/sp tokens


def test_a_row_too_long_for_one_gpu_is_refused_naming_sp_sizes_that_fit(monkeypatch):
    message = refusal_of_30b(monkeypatch, ["+recipe=30b_a3b_lora", "data.max_length=262144", "data.tokens_per_batch=262144"],
                             device_gib=79.6)
    # 4 KV heads: sp 8 replicates them, sp 3 divides neither the world nor the heads; sp 2 (131,072
    # tokens a rank, the experts' backward of 1,048,576 routed rows) needs about 95 GiB
    assert all(f"parallel.sp_size={s}:" in message for s in (4, 8))
    assert "parallel.sp_size=2:" not in message
    assert "parallel.sp_size=3" not in message


@pytest.mark.parametrize("overrides, trains", [
    (["peft=lora"], (False, False)),  # the long-video recipes: LoRA on the text only
    (["peft=lora", "peft.merger=true"], (False, True)),
    (["peft=lora", "peft.vision=true"], (True, True)),
    (["optim.freeze_vision=true"], (False, True)),  # full SFT of all but the vision blocks
])
def test_the_plan_counts_vision_activations_only_where_the_tower_keeps_them_for_backward(overrides, trains):
    from qvl_train.peft import LoraSettings, apply_lora
    from qvl_train.plan import activation_lines, vision_trains

    cfg = to_config(compose(overrides))
    model_cfg = tiny_config()
    model = build_model(model_cfg)
    apply_freeze(model, cfg.optim)
    if cfg.peft.method == "lora":
        apply_lora(model, LoraSettings.from_section(cfg.peft))
    visual, part, kept = model.model.visual, ["other"], {"blocks": 0, "mergers": 0, "other": 0}
    for name, modules in (("blocks", visual.blocks), ("mergers", [visual.merger, *visual.deepstack_merger_list])):
        for m in modules:
            m.register_forward_pre_hook(lambda m, a, name=name: part.__setitem__(0, name))
            m.register_forward_hook(lambda m, a, o: part.__setitem__(0, "other"))

    def pack(t):
        kept[part[0]] += 1
        return t

    grid = torch.tensor([[2, 4, 4]])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        visual(torch.randn(32, model_cfg.vision.patch_dim), grid)
    assert vision_trains(cfg) == trains == (kept["blocks"] > 0, kept["mergers"] > 0)
    assert kept["other"] == 0 or trains[0]  # patch embedding / positions: only with the blocks
    cfg.model.activation_checkpointing = True
    frozen = to_config(compose(["peft=lora", "model.activation_checkpointing=true"]))
    gap = activation_lines(cfg, model_cfg, b=4, ep=1)[0].gib - activation_lines(frozen, model_cfg, b=4, ep=1)[0].gib
    v, patches = model_cfg.vision, 4 * cfg.data.tokens_per_batch * cfg.plan.visual_fraction
    per_patch = v.depth if trains[0] else 3 * (1 + len(v.deepstack_visual_indexes)) if trains[1] else 0
    assert gap * 2**30 == pytest.approx(patches * per_patch * v.hidden_size * 4)
