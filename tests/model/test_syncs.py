"""No host sync inside a decoder layer's forward or backward (MoE routing included), checked on
CPU by recording every op that would make a CUDA device wait for the host: scalar reads
(.item(), bool(), int(), float()), .tolist(), nonzero, boolean-mask indexing, masked_select,
unique, bincount, and repeat_interleave without output_size."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qvl_train.model import build_model
from qvl_train.model.attention import resolve_attn_impl, text_attention
from qvl_train.model.rope import mrope_cos_sin

from .reference import tiny_config

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique", "_unique2",
             "unique_dim", "unique_consecutive"}


class SyncRecorder(TorchDispatchMode):
    """Records the ops that sync a CUDA device with the host (their names, in order)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        recorder = self

        def tolist(t):
            recorder.syncs.append("tolist")
            return recorder._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            self.syncs.append("repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.syncs.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


def test_recorder_sees_the_usual_syncs():
    x = torch.arange(6.0)
    with SyncRecorder() as rec:
        bool(x.all()), x.sum().item(), x.tolist(), x[x > 2], torch.bincount(x.long()), x.nonzero()
    assert rec.syncs == ["_local_scalar_dense", "_local_scalar_dense", "tolist", "index with a boolean mask",
                         "bincount", "nonzero"]


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
    device-resident (model inputs sent to the GPU, parameters, buffers) and everything computed
    from them are tracked; host reads of other tensors (CPU metadata) cost no sync and are not
    recorded. (Tensors created from scratch count as host: reads of `arange(device=...)` alone
    would be missed.)"""

    def __init__(self, device_tensors):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.on_device = WeakIdKeyDictionary({t: True for t in device_tensors})

    def __enter__(self):
        recorder = self

        def tolist(t):
            if t in recorder.on_device:
                recorder.syncs.append("tolist")
            return recorder._tolist(t)

        torch.Tensor.tolist = tolist
        return TorchDispatchMode.__enter__(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(t in self.on_device for t in tensors):
            return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.on_device[t] = True
        return out


def test_device_recorder_tells_device_reads_from_host_reads():
    dev, host = torch.arange(6.0), torch.arange(6.0)
    with DeviceSyncRecorder([dev]) as rec:
        host.tolist(), int(host.sum()), (host + 1).nonzero()
        (dev * 2).tolist(), bool(dev.all())
    assert rec.syncs == ["tolist", "_local_scalar_dense"]


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
