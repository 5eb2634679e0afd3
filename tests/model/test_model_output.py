"""ModelOutput is a dict whose items follow its attributes, so DeepSpeed ZeRO-3's module hooks find
(and may replace) its tensors; a KVCache stays an attribute only."""

import torch

from qvl_train.model.model import ModelOutput
from qvl_train.model.text import KVCache


def test_deepspeed_hooks_reach_every_tensor_and_the_attributes_follow():
    from deepspeed.runtime.zero.utils import apply_to_tensors_only

    out = ModelOutput(logits=torch.ones(2), loss=torch.tensor(3.0), router_logits=[torch.zeros(1), torch.ones(1)],
                      cache=KVCache(1))
    unknown = []
    seen = apply_to_tensors_only(lambda t: t + 1, out, warning_msg_fn=lambda v: unknown.append(type(v)) or "")
    assert seen is out and not unknown  # DeepSpeed knows every value: no "unknown outputs type"
    assert out.loss.item() == 4.0 and out["loss"] is out.loss  # replaced in place, attribute included
    assert [t.item() for t in out.router_logits] == [1.0, 2.0] and out.logits.tolist() == [2.0, 2.0]
    assert "cache" not in out and isinstance(out.cache, KVCache)
    out.aux_loss = torch.tensor(1.0)
    assert out["aux_loss"] is out.aux_loss
