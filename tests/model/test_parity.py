"""Numerical parity with transformers' Qwen3VLMoeForConditionalGeneration (eager attention, eager
experts) in fp32 on tiny random configs."""

import pytest
import torch

from qvl_train.model import generate

from .reference import make_batch, ours_kwargs, pair, tiny_config

ATOL = 1e-4

CASES = {
    "text_only": ([[17], [11]], "right"),
    "one_image": ([[5, ("image", (1, 4, 6)), 7]], "right"),
    "several_images_non_square": ([[3, ("image", (1, 4, 6)), 2, ("image", (1, 6, 2)), 4, ("image", (1, 2, 8)), 1]], "right"),
    "video_t3": ([[3, ("video", (3, 4, 4)), 5]], "right"),
    "image_and_video": ([[3, ("image", (1, 4, 4)), 2, ("video", (2, 2, 4)), 5], [4, ("video", (2, 4, 2)), 6, ("image", (1, 2, 2)), 1]], "right"),
    "left_padding": ([[3, ("image", (1, 4, 6)), 2], [9, ("image", (1, 2, 2)), 13]], "left"),
    "right_padding": ([[3, ("image", (1, 4, 6)), 2], [9, ("image", (1, 2, 2)), 13]], "right"),
}


def _logits(model, hf, batch):
    with torch.no_grad():
        ours = model(**ours_kwargs(batch)).logits
        ref = hf(**batch).logits
    mask = batch["attention_mask"].bool()  # padded positions are garbage in both
    return ours[mask], ref[mask]


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match(name):
    cfg = tiny_config()
    model, hf = pair(cfg)
    rows, padding = CASES[name]
    ours, ref = _logits(model, hf, make_batch(cfg, rows, padding=padding))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "changes", [{"mlp_only_layers": [0, 2]}, {"decoder_sparse_step": 2}, {"num_key_value_heads": 4}]
)
def test_logits_match_layer_layouts(changes):
    cfg = tiny_config(**changes)
    model, hf = pair(cfg)
    assert any(not layer.is_moe for layer in model.model.language_model.layers) or "num_key_value_heads" in changes
    ours, ref = _logits(model, hf, make_batch(cfg, CASES["image_and_video"][0]))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def _labels(batch):
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :3] = -100
    return labels


@pytest.mark.parametrize("padding", ["right", "left"])
def test_loss_aux_and_gradients_match(padding):
    cfg = tiny_config(router_aux_loss_coef=0.05)
    model, hf = pair(cfg)
    model.train(), hf.train()
    batch = make_batch(cfg, CASES["image_and_video"][0], padding=padding)
    labels = _labels(batch)
    ours = model(**ours_kwargs(batch), labels=labels)
    ref = hf(**batch, labels=labels, output_router_logits=True)
    torch.testing.assert_close(ours.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.loss, ours.ce_loss + 0.05 * ours.aux_loss)
    ours.loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        g_ref = hf_params[name].grad
        if name == "model.visual.patch_embed.proj.weight":
            g_ref = g_ref.reshape(p.shape)
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_router_logits_per_layer_match():
    cfg = tiny_config()
    model, hf = pair(cfg)
    batch = make_batch(cfg, CASES["one_image"][0])
    with torch.no_grad():
        ours = model(**ours_kwargs(batch)).router_logits
        ref = hf(**batch, output_router_logits=True).router_logits
    assert len(ours) == len(ref) == cfg.text.num_hidden_layers
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.reshape(a.shape), atol=ATOL, rtol=0)


def test_aux_coefficient_zero_disables_aux_but_still_reports_it():
    cfg = tiny_config(router_aux_loss_coef=0.0)
    model, _ = pair(cfg)
    batch = make_batch(cfg, CASES["one_image"][0])
    out = model(**ours_kwargs(batch), labels=_labels(batch))
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss)


@pytest.mark.parametrize("rows", [CASES["one_image"][0], CASES["image_and_video"][0], [[6], [9]]])
def test_greedy_generation_matches_transformers(rows):
    cfg = tiny_config()
    model, hf = pair(cfg)
    batch = make_batch(cfg, rows, padding="left")
    ours = generate(model, **ours_kwargs(batch), max_new_tokens=8, eos_token_id=[], pad_token_id=0)
    ref = hf.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_sampling_is_seeded_and_in_vocab():
    cfg = tiny_config()
    model, _ = pair(cfg)
    batch = make_batch(cfg, CASES["one_image"][0])
    runs = [
        generate(model, **ours_kwargs(batch), max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9,
                 temperature=0.8, eos_token_id=[], generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape[1] == batch["input_ids"].shape[1] + 6
    assert int(runs[0].max()) < cfg.text.vocab_size


def test_mismatched_image_token_count_raises():
    cfg = tiny_config()
    model, _ = pair(cfg)
    batch = make_batch(cfg, CASES["one_image"][0])
    ids = batch["input_ids"]
    first = int((ids[0] == cfg.image_token_id).nonzero()[0])
    ids[0, first] = 5  # drop one placeholder
    with pytest.raises(ValueError, match=r"do not match: 5 <\|image_pad\|> tokens .* 6 features"):
        model(**ours_kwargs(batch))
