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
