"""Packed rows (segment_ids) give each sample exactly the logits and loss it gets alone."""

import pytest
import torch

from qvl_train.model import build_model

from .reference import make_batch, ours_kwargs, tiny_config


def _pack(samples):
    keys = ["input_ids", "attention_mask"]
    packed = {k: torch.cat([s[k] for s in samples], dim=1) for k in keys}
    packed["segment_ids"] = torch.cat([torch.full_like(s["input_ids"], i) for i, s in enumerate(samples)], dim=1)
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [s for s in samples if grid in s]
        if parts:
            packed[pix] = torch.cat([s[pix] for s in parts])
            packed[grid] = torch.cat([s[grid] for s in parts])
    return packed


def test_packed_logits_equal_each_sample_alone():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    samples = [
        make_batch(cfg, [[5, ("image", (1, 4, 6)), 7]], seed=1),
        make_batch(cfg, [[9]], seed=2),
        make_batch(cfg, [[3, ("video", (2, 2, 4)), 2, ("image", (1, 2, 2)), 4]], seed=3),
    ]
    packed = _pack(samples)
    # a padded tail after the packed samples, as the batcher leaves it
    pad = 6
    packed["input_ids"] = torch.nn.functional.pad(packed["input_ids"], (0, pad))
    packed["attention_mask"] = torch.nn.functional.pad(packed["attention_mask"], (0, pad))
    packed["segment_ids"] = torch.nn.functional.pad(packed["segment_ids"], (0, pad), value=-1)
    with torch.no_grad():
        out = model(**packed)
        start = 0
        for s in samples:
            alone = model(**ours_kwargs(s)).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(out.logits[0, start : start + n], alone, atol=1e-5, rtol=0)
            start += n


def test_packed_loss_never_predicts_across_samples():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    samples = [make_batch(cfg, [[8]], seed=1), make_batch(cfg, [[6]], seed=2)]
    packed = _pack(samples)
    labels = packed["input_ids"].clone()  # train on every token, prompts included
    with torch.no_grad():
        loss = model(**packed, labels=labels, loss_normalizer=1.0).ce_loss
        alone = sum(model(**ours_kwargs(s), labels=s["input_ids"], loss_normalizer=1.0).ce_loss for s in samples)
    torch.testing.assert_close(loss, alone, atol=1e-4, rtol=1e-5)


def test_activation_checkpointing_gives_identical_gradients():
    cfg = tiny_config()
    batch = make_batch(cfg, [[5, ("image", (1, 4, 6)), 7]])
    grads = []
    for ckpt in (False, True):
        model = build_model(cfg).train()
        model.set_activation_checkpointing(ckpt)
        model(**ours_kwargs(batch), labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_supervised_only_loss_equals_full_loss_with_grads(packed):
    cfg = tiny_config(router_aux_loss_coef=0.0)
    model = build_model(cfg).train()
    samples = [make_batch(cfg, [[5, ("image", (1, 4, 6)), 7]], seed=1), make_batch(cfg, [[20]], seed=2)]
    batch = _pack(samples) if packed else ours_kwargs(samples[0])
    labels = batch["input_ids"].clone()
    labels[:, :4] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(**batch, labels=labels, loss_normalizer=7.0, return_logits=return_logits)
        out.loss.backward()
        results.append((out.ce_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert (out.logits is None) == (not return_logits)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_supervised_only_loss_without_targets_is_zero_and_keeps_the_head_in_the_graph():
    cfg = tiny_config()
    model = build_model(cfg).train()
    batch = make_batch(cfg, [[9]])
    labels = torch.full_like(batch["input_ids"], -100)
    out = model(**ours_kwargs(batch), labels=labels, return_logits=False)
    assert float(out.ce_loss) == 0.0
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
