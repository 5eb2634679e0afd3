"""Packed rows (segment_ids) give each sample exactly the logits and loss it gets alone."""

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
