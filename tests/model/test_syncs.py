"""Host syncs: no read of device data in a whole training step (vision tower, text model,
loss, backward) but the one placeholder-count check per batch, checked on CPU by recording every
op that would make a CUDA device wait for the host: scalar reads (.item(), bool(), int(),
float()), .tolist(), .cpu() / .to("cpu") / .numpy() of device data, torch.equal, nonzero,
boolean-mask indexing, masked_select, unique, bincount, and repeat_interleave without output_size."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qvl_train.model import build_model
from qvl_train.model.attention import resolve_attn_impl, text_attention
from qvl_train.model.rope import mrope_cos_sin

from .reference import tiny_config

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "equal"}


class SyncRecorder(TorchDispatchMode):
    """Records the ops that sync a CUDA device with the host (their names, in order)."""

    # tensor methods that copy device data to the host without a dispatch on a CPU-only machine
    # (a CPU tensor's .cpu() returns itself), so they are caught here
    _READS = ("tolist", "cpu", "numpy", "to")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._originals = {name: getattr(torch.Tensor, name) for name in self._READS}
        self._in_read = False

    def is_device(self, t: torch.Tensor) -> bool:
        return True

    def __enter__(self):
        recorder = self

        def patched(name):
            original = recorder._originals[name]

            def read(t, *args, **kwargs):
                counted = recorder.is_device(t) and (name != "to" or _to_host(args, kwargs))
                if counted:
                    recorder.syncs.append(f".{name}()" if name != "tolist" else "tolist")
                recorder._in_read, outer = counted or recorder._in_read, recorder._in_read  # not again as _to_copy
                try:
                    return original(t, *args, **kwargs)
                finally:
                    recorder._in_read = outer

            return read

        for name in self._READS:
            setattr(torch.Tensor, name, patched(name))
        return TorchDispatchMode.__enter__(self)

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return TorchDispatchMode.__exit__(self, *exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            self.syncs.append("repeat_interleave without output_size")
        elif (name == "_to_copy" and not self._in_read and getattr(kwargs.get("device"), "type", None) == "cpu"
              and kwargs.get("dtype", args[0].dtype) == args[0].dtype):
            # a copy that names the CPU (`.to("cpu")` is caught above; on this machine a cast
            # `.to(device=..., dtype=...)` to the run's device looks the same, so only copies that
            # keep the dtype count)
            self.syncs.append("_to_copy to cpu")
        elif name == "copy_" and self.is_device(args[1]) and not self.is_device(args[0]):
            self.syncs.append("copy_ into a host tensor")
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.syncs.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


def _to_host(args, kwargs) -> bool:
    """Whether Tensor.to(*args, **kwargs) names the host: the string "cpu" (on this CPU-only
    machine `.to(device)` with the run's device object is the same call, and on a GPU it is a
    no-op or a host-to-device copy, so only the spelled-out host counts)."""
    return any(isinstance(a, str) and torch.device(a).type == "cpu" for a in (*args, kwargs.get("device")))


def test_recorder_sees_the_usual_syncs():
    x = torch.arange(6.0)
    with SyncRecorder() as rec:
        bool(x.all()), x.sum().item(), x.tolist(), x[x > 2], torch.bincount(x.long()), x.nonzero()
        x.cpu(), x.to("cpu"), x.numpy(), torch.equal(x, x), x.to(torch.float64), x.to("cpu", copy=True)
        x.to(torch.device("cpu"), copy=True)
    assert rec.syncs == ["_local_scalar_dense", "_local_scalar_dense", "tolist", "index with a boolean mask",
                         "bincount", "nonzero", ".cpu()", ".to()", ".numpy()", "equal", ".to()", "_to_copy to cpu"]


def test_moe_decoder_layer_forward_and_backward_never_sync():
    cfg = tiny_config()
    model = build_model(cfg, seed=0)
    text = model.model.language_model
    layer = next(layer for layer in text.layers if layer.is_moe)
    B, L = 2, 24
    x = torch.randn(B, L, cfg.text.hidden_size, requires_grad=True)
    token_mask = torch.ones(B, L, dtype=torch.long)
    token_mask[1, 17:] = 0  # a padded row
    positions = torch.arange(L).expand(3, B, L)
    rope = mrope_cos_sin(positions, inv_freq_F=text.inv_freq, axis_F=text.mrope_axis, dtype=x.dtype)
    # the attention plan is built once per forward, outside the layers (as TextModel does)
    attend = text_attention(resolve_attn_impl("auto", x.device, x.dtype), attention_mask_BLk=token_mask,
                            segment_ids_BL=None, q_len=L, kv_len=L, device=x.device)
    with SyncRecorder() as rec:
        y, logits, experts = layer(x, rope, attend, token_mask)
        (y.square().sum() + logits.sum()).backward()
    assert rec.syncs == []
    assert x.grad is not None and layer.mlp.experts.gate_up_proj.grad is not None
    # padding rows: marked E in the routed ids, zero output from the experts
    assert (experts.view(B, L, -1)[1, 17:] == cfg.text.num_experts).all()


class DeviceSyncRecorder(SyncRecorder):
    """SyncRecorder for reads of DEVICE data only, on a CPU-only machine: tensors marked as
    device-resident (model inputs sent to the GPU, parameters, buffers), tensors made from
    scratch by a factory op (`arange`, `zeros`, ...: code in a forward passes the device to
    them) and everything computed from those are tracked; host reads of other tensors (CPU
    metadata, and `torch.tensor(list)` built from host values) cost no sync and are not recorded."""

    _FACTORIES = {"arange", "zeros", "ones", "full", "empty", "empty_strided", "rand", "randn", "randint",
                  "linspace", "eye", "scalar_tensor"}

    def __init__(self, device_tensors):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.on_device = WeakIdKeyDictionary({t: True for t in device_tensors})

    def is_device(self, t: torch.Tensor) -> bool:
        return t in self.on_device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fresh = not tensors and func.overloadpacket.__name__ in self._FACTORIES
        if not fresh and not any(t in self.on_device for t in tensors):
            return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.on_device[t] = True
        return out


def test_device_recorder_tells_device_reads_from_host_reads():
    dev, host = torch.arange(6.0), torch.arange(6.0)
    with DeviceSyncRecorder([dev]) as rec:
        host.tolist(), int(host.sum()), (host + 1).nonzero(), host.cpu(), torch.tensor([1, 2]).tolist()
        (dev * 2).tolist(), bool(dev.all()), dev.cpu(), host.clone().copy_(dev)
        torch.arange(3, device=dev.device).tolist()  # made on the device
    assert rec.syncs == ["tolist", "_local_scalar_dense", ".cpu()", "copy_ into a host tensor", "tolist"]


def test_grids_stay_on_the_host_and_embedding_reads_device_data_once():
    """The trainer keeps *_grid_thw on the CPU (evaluate.to_device), so the vision tower and the
    feature split read them for free: the embedding step's one .tolist() of device data is the
    placeholder counts it validates against the grids (once per batch). The visual features are
    scattered to positions of host-known count (nonzero_static), in the embedding and in the
    DeepStack adds of the text model, forward and backward: no further read."""
    from qvl_train.data import model_inputs
    from qvl_train.train.evaluate import to_device

    from .reference import make_batch

    cfg = tiny_config()
    model = build_model(cfg, seed=0)
    batch = make_batch(cfg, [[5, ("image", (1, 4, 4)), 6, ("video", (2, 4, 4)), 3], [4, ("image", (1, 8, 4)), 9]])
    batch.update(labels=batch["input_ids"], position_ids=None, segment_ids=None)
    elsewhere = to_device(batch, torch.device("meta"))  # a stand-in for the GPU
    assert {k for k, v in elsewhere.items() if v is not None and v.device.type == "cpu"} == {"image_grid_thw", "video_grid_thw"}
    assert set(elsewhere) == set(model_inputs(batch))
    inputs = to_device(batch, torch.device("cpu"))
    on_device = [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and "grid" not in k]
    on_device += [*model.parameters(), *model.buffers()]
    with DeviceSyncRecorder(on_device) as rec:
        embeds, visual_mask, deepstack = model._embed(
            inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"], inputs["pixel_values_videos"],
            inputs["video_grid_thw"],
        )
        assert rec.syncs == ["tolist"]
        text = model.model.language_model
        B, L = inputs["input_ids"].shape
        hidden, _, _ = text(embeds, position_ids_3BL=torch.arange(L).expand(3, B, L), attention_mask_BLk=None,
                            visual_mask_BL=visual_mask, deepstack=deepstack)
        hidden.square().sum().backward()
    assert rec.syncs == ["tolist"]
    # and the same step with the grids on the device would read them back several times
    with DeviceSyncRecorder([*on_device, inputs["image_grid_thw"], inputs["video_grid_thw"]]) as rec:
        model._embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"],
                     inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert len(rec.syncs) > 1


def _loader_batch(cfg, model) -> dict:
    """Two packed rows as the loader's collate makes them: an image sample and a text sample in
    row 0, a video sample in row 1, both rows padded (pad_to_multiple_of)."""
    from qvl_train.data.packing import collate

    from .reference import make_batch

    samples = []
    for items in ([5, ("image", (1, 4, 4)), 6], [7], [4, ("video", (2, 4, 4)), 3]):
        b = make_batch(cfg, [items], seed=len(samples))
        ids = b["input_ids"][0]
        positions, _ = model.rope_index(b["input_ids"], b.get("image_grid_thw"), b.get("video_grid_thw"))
        labels = ids.clone()
        labels[: len(ids) // 2] = -100  # a prompt
        sample = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "position_ids": positions[:, 0]}
        sample.update({k: b[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in b})
        samples.append(sample)
    batch = collate([[samples[0], samples[1]], [samples[2]]], pad_token_id=0, pad_to_multiple_of=16)
    assert (batch["attention_mask"] == 0).any(dim=1).all(), "both rows padded"
    return batch


def test_a_whole_training_step_reads_device_data_once():
    """The trainer's micro-step on a loader batch (packed rows, padding, an image and a video):
    vision tower, text model with every layer, fused loss, aux loss, then backward, with
    activation checkpointing. The only read of device data is the embedding's placeholder
    count check (one .tolist() per batch); the attention plans of the text model and the vision
    tower come from host metadata."""
    from qvl_train.train.evaluate import to_device

    cfg = tiny_config()
    model = build_model(cfg, seed=0)
    model.train()
    model.set_activation_checkpointing(True)
    batch = _loader_batch(cfg, model)
    inputs = to_device(batch, torch.device("cpu"))
    normaliser = torch.tensor(float(batch["stats"]["trained_tokens"]))  # a device scalar, as in the trainer
    on_device = [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and "grid" not in k]
    on_device += [*model.parameters(), *model.buffers(), normaliser]
    with DeviceSyncRecorder(on_device) as rec:
        out = model(**inputs, loss_normalizer=normaliser, return_logits=False)
        out.loss.backward()
    assert rec.syncs == ["tolist"]
    assert out.aux_loss is not None and model.model.visual.patch_embed.proj.weight.grad is not None
    assert batch["attention_layout"] is not None and inputs["num_targets"] == batch["stats"]["trained_tokens"]
    # the host metadata changes nothing but the reads: the same step derived from the masks
    with torch.no_grad():
        plain = {k: v for k, v in inputs.items() if k not in ("attention_layout", "num_targets")}
        ref = model(**plain, loss_normalizer=normaliser, return_logits=False)
    torch.testing.assert_close(out.loss.detach(), ref.loss)
