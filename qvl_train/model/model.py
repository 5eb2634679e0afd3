"""Qwen3-VL-MoE for conditional generation: vision tower + text decoder + lm head, the loss
(token-mean cross entropy + router_aux_loss_coef x load-balancing loss) and feature extraction.

forward() takes transformers' keyword names (input_ids, attention_mask, position_ids,
pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, labels; mm_token_type_ids is
accepted and unused: token types are read off input_ids), so a processor batch can be fed as is.
Packed rows add `segment_ids` (B, L): samples numbered within the row; attention, positions
and the loss never cross them. The loader's batches also carry host metadata, `attention_layout`
and `num_targets`, with which a training forward reads no device data but the placeholder counts.

`sequence_slice` (a SequenceSlice): the forward sees one contiguous slice of longer rows
(sequence parallelism). The model stays single-device: everything about the rest of the rows
(the vision tower's share, the attention over the whole rows, the router statistics) is reached
through the slice's callables, which qvl_train.parallel.sequence builds.

Legend: B batch, L sequence, D hidden, V vocab, M merged visual tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DocumentLayout, check_attn_impl, resolve_attn_impl
from .config import ModelConfig
from .loss import IGNORE_INDEX, LMHead
from .moe import expert_counts, load_balancing_loss
from .rope import get_rope_index
from .text import KVCache, TextModel
from .vision import VisionTower


@dataclass
class VisualFeatures:
    """Per image (or video) merged features and, per DeepStack level, the same split."""

    embeds: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]]


@dataclass
class SequenceSlice:
    """What a forward over a slice of longer rows needs from outside (built per batch by
    qvl_train.parallel.sequence; the tensors are the slice's, the pixels the WHOLE rows').

    - targets_BL: the slice's next-token targets, shifted on the whole row (so a slice's last
      token predicts the next slice's first token), IGNORE_INDEX where nothing is predicted.
    - visual_index_M: host long tensor: for each visual token of the slice, in token order, its
      row in the vision tower's output for the whole pixel values (images first, then videos).
    - encode_visual(tower, pixel_values, grid_thw, *, wanted_M) -> (embeds (M, O), [deepstack
      (M, O)] per level): those rows of tower(pixel_values, grid_thw).
    - plan_attention(kernel, *, attention_mask_BLk, segment_ids_BL, q_len, kv_len, device) ->
      the decoder's attention callable for this slice (text_attention's contract).
    - reduce_router_stats(stats) -> the sum of `stats` over every slice of the rows
      (differentiable: the aux loss is then the whole rows' one).
    - num_targets: the count of targets_BL's targets, if known on the host.
    """

    targets_BL: torch.Tensor
    visual_index_M: torch.Tensor
    encode_visual: Callable
    plan_attention: Callable
    reduce_router_stats: Callable[[torch.Tensor], torch.Tensor]
    num_targets: int | None = None  # targets_BL's count, when known on the host (no device read)


@dataclass
class ModelOutput(dict):
    """Attributes (out.loss) that are also dict items (out["loss"]), kept in sync both ways.

    Why a dict: DeepSpeed ZeRO-3 hooks every module's outputs to re-gather parameters before
    backward, and it finds tensors only in tensors, lists, tuples and dicts (dicts updated in
    place; runtime/zero/utils.py apply_to_tensors_only). A plain dataclass hides its tensors from
    those hooks (and DeepSpeed warns "unknown inputs or outputs type"). transformers' ModelOutput
    is an OrderedDict for the same reason. `cache` (generation only, no backward) is an attribute
    but not an item: DeepSpeed cannot look inside a KVCache and need not."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: list[torch.Tensor] = field(default_factory=list)
    expert_load: torch.Tensor | None = None  # (num MoE layers, E) routed tokens, padding excluded
    rope_deltas: torch.Tensor | None = None
    cache: KVCache | None = None

    _NOT_ITEMS = frozenset({"cache"})

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name not in self._NOT_ITEMS:
            dict.__setitem__(self, name, value)

    def __setitem__(self, key: str, value) -> None:
        if key not in self.__dataclass_fields__ or key in self._NOT_ITEMS:
            raise KeyError(f"ModelOutput has no item {key!r}")
        setattr(self, key, value)


class Backbone(nn.Module):
    """Holds `visual` and `language_model` under the names the Hub checkpoint uses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.visual = VisionTower(cfg.vision)
        self.language_model = TextModel(cfg.text)


class Qwen3VLMoe(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = LMHead(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.run_vision_always = False  # set by data-parallel trainers (see _embed)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- visual features -------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisualFeatures:
        embeds_MO, deepstack_MO = self.model.visual(pixel_values, image_grid_thw)
        sizes = (image_grid_thw.prod(-1) // self.config.vision.spatial_merge_size**2).tolist()
        return VisualFeatures(
            embeds=list(torch.split(embeds_MO, sizes)),
            deepstack=[list(torch.split(f, sizes)) for f in deepstack_MO],
        )

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> VisualFeatures:
        return self.get_image_features(pixel_values_videos, video_grid_thw)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        attention_layout: DocumentLayout | None = None,
        num_targets: int | None = None,
        cache: KVCache | None = None,
        loss_normalizer: float | torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        sequence_slice: SequenceSlice | None = None,
    ) -> ModelOutput:
        """`loss_normalizer`: divide the summed token CE by this (e.g. the global batch's
        supervised token count) instead of taking the local mean.

        `return_logits=False` (training): with labels, only supervised positions are projected to
        the vocabulary (the full (B, L, vocab) logits and their fp32 copy are ~20 GB at 16k
        tokens x 152k vocab); `logits` is then None.

        `attention_layout` (attention.DocumentLayout) and `num_targets` (the count of next-token
        targets in `labels`): host metadata from the loader (data.collate), which must describe
        this batch; with them the attention plan and the loss's row selection read nothing back
        from the device. Without them both are derived on the device."""
        del mm_token_type_ids  # derived from input_ids
        sl = sequence_slice
        if sl is None:
            embeds_BLD, visual_mask_BL, deepstack = self._embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        else:
            assert position_ids is not None, "a slice's positions come from its whole row"
            embeds_BLD, visual_mask_BL, deepstack = self._embed_slice(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, sl
            )
        rope_deltas = None
        if position_ids is None:
            position_ids, rope_deltas = self.rope_index(
                input_ids, image_grid_thw, video_grid_thw, attention_mask, segment_ids
            )
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:  # transformers' (text, t, h, w) form
            position_ids = position_ids[1:]
        hidden_BLD, router_logits, routed = self.model.language_model(
            embeds_BLD,
            position_ids_3BL=position_ids,
            attention_mask_BLk=attention_mask,
            segment_ids_BL=segment_ids,
            visual_mask_BL=visual_mask_BL,
            deepstack=deepstack,
            cache=cache,
            layout=attention_layout,
            plan_attention=None if sl is None else sl.plan_attention,
        )
        if logits_to_keep:
            hidden_BLD = hidden_BLD[:, -logits_to_keep:]
        supervised_only = labels is not None and not return_logits
        logits_BLV = None if supervised_only else self.lm_head(hidden_BLD)
        out = ModelOutput(logits=logits_BLV, router_logits=router_logits, rope_deltas=rope_deltas, cache=cache)
        if router_logits:
            out.expert_load = self._expert_load(routed)
        if labels is None:
            return out
        targets_BL = shifted_labels(labels, segment_ids) if sl is None else sl.targets_BL
        if supervised_only:
            out.ce_loss = supervised_target_loss(self.lm_head, hidden_BLD, targets_BL, normalizer=loss_normalizer,
                                                 num_targets=num_targets if sl is None else sl.num_targets)
        else:
            out.ce_loss = target_loss(logits_BLV, targets_BL, normalizer=loss_normalizer)
        out.loss = out.ce_loss
        if router_logits:
            t = self.config.text
            token_mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
            out.aux_loss = load_balancing_loss(
                router_logits, num_experts=t.num_experts, top_k=t.num_experts_per_tok, token_mask_T=token_mask,
                reduce=None if sl is None else sl.reduce_router_stats,
            )
            if t.router_aux_loss_coef:
                out.loss = out.ce_loss + t.router_aux_loss_coef * out.aux_loss
        return out

    def rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, segment_ids=None):
        return get_rope_index(
            input_ids,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision.spatial_merge_size,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
        )

    def _embed(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Token embeddings with visual features scattered into the pad positions, the visual
        token mask and the DeepStack features in token order.

        Images and videos go through the vision tower in ONE call (never zero or two calls,
        whatever the batch holds), so every data-parallel rank runs the same collectives under
        ZeRO-3. With `run_vision_always`, a text-only batch runs a 4-patch dummy image whose
        output is added times zero (ranks that see no image must not hang the others).
        """
        embeds_BLD = self.model.language_model.embed_tokens(input_ids)
        img_mask_BL, vid_mask_BL = input_ids == self.config.image_token_id, input_ids == self.config.video_token_id
        # the batch's one host read of device data here (both kinds' placeholder counts, for the
        # checks below); the grids are read on the host where they stay on the CPU
        num_tokens = dict(zip(("image", "video"), torch.stack([img_mask_BL.sum(), vid_mask_BL.sum()]).tolist()))
        kinds = []  # (name, token mask, pixels, grid)
        for name, mask, pixels, grid in (
            ("image", img_mask_BL, pixel_values, image_grid_thw),
            ("video", vid_mask_BL, pixel_values_videos, video_grid_thw),
        ):
            if pixels is not None:
                kinds.append((name, mask, pixels, grid))
            elif num_tokens[name]:
                raise ValueError(f"input_ids contain {name} tokens but no {name} pixels were given.")
        if not kinds:
            if self.run_vision_always:
                embeds_BLD = embeds_BLD + 0.0 * self._dummy_vision_output(embeds_BLD)
            return embeds_BLD, None, None
        feats = self.get_image_features(
            torch.cat([k[2] for k in kinds]), torch.cat([k[3].to(kinds[0][3].device) for k in kinds])
        )
        per_kind = [len(k[3]) for k in kinds]
        splits = [sum(per_kind[:i]) for i in range(len(kinds) + 1)]
        D = embeds_BLD.shape[-1]
        embeds_TD = embeds_BLD.reshape(-1, D)
        for i, (name, mask, _, _) in enumerate(kinds):
            embeds = feats.embeds[splits[i] : splits[i + 1]]
            n_tokens, n_feats = num_tokens[name], sum(f.shape[0] for f in embeds)
            if n_tokens != n_feats:
                merge = self.config.vision.spatial_merge_size**2
                raise ValueError(
                    f"{name.capitalize()} features and {name} tokens do not match: {n_tokens} <|{name}_pad|> "
                    f"tokens in input_ids but {n_feats} features from {name}_grid_thw. Each {name} needs "
                    f"prod(grid_thw)/{merge} pad tokens."
                )
            # positions of a host-known count: nonzero_static needs no sync, where masked_scatter
            # and boolean indexing read the mask's count back
            pos_N = torch.nonzero_static(mask.reshape(-1), size=n_tokens).squeeze(1)
            embeds_TD = embeds_TD.index_put((pos_N,), torch.cat(embeds).to(embeds_TD.dtype))
        embeds_BLD = embeds_TD.view(embeds_BLD.shape)
        visual_mask_BL = img_mask_BL | vid_mask_BL
        deepstack = []
        if len(kinds) == 2:  # where each kind's features go among the visual tokens (token order)
            n_img, n_vid = num_tokens["image"], num_tokens["video"]
            visual_N = torch.nonzero_static(visual_mask_BL.reshape(-1), size=n_img + n_vid).squeeze(1)
            is_img_N = img_mask_BL.reshape(-1)[visual_N]
            slots = [torch.nonzero_static(is_img_N, size=n_img).squeeze(1),
                     torch.nonzero_static(~is_img_N, size=n_vid).squeeze(1)]
        # per level: features of every visual token in token order (images and videos interleaved)
        for level in feats.deepstack:
            by_kind = [torch.cat(level[splits[i] : splits[i + 1]]) for i in range(len(kinds))]
            if len(kinds) == 1:
                deepstack.append(by_kind[0])
                continue
            joint = by_kind[0].new_empty(n_img + n_vid, by_kind[0].shape[-1])
            deepstack.append(joint.index_put((slots[0],), by_kind[0]).index_put((slots[1],), by_kind[1]))
        return embeds_BLD, visual_mask_BL, deepstack

    def _embed_slice(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                     sl: SequenceSlice):
        """_embed for a slice of longer rows. The pixels and grids are the whole rows' (images,
        then videos, as _embed concatenates them); `sl.encode_visual` returns the tower rows of
        this slice's visual tokens, in token order, so images and videos need no interleaving
        here. (The counts of pad tokens and features were checked on the whole rows.)"""
        embeds_BLD = self.model.language_model.embed_tokens(input_ids)
        pixels = [p for p in (pixel_values, pixel_values_videos) if p is not None]
        if not pixels:
            if self.run_vision_always:
                embeds_BLD = embeds_BLD + 0.0 * self._dummy_vision_output(embeds_BLD)
            return embeds_BLD, None, None
        grids = [g for g, p in ((image_grid_thw, pixel_values), (video_grid_thw, pixel_values_videos)) if p is not None]
        grid = torch.cat([g.to(grids[0].device) for g in grids])
        # every slice runs this (also one without visual tokens): the tower's work is collective
        embeds_MO, deepstack = sl.encode_visual(self.model.visual, torch.cat(pixels), grid, wanted_M=sl.visual_index_M)
        visual_mask_BL = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        pos_M = torch.nonzero_static(visual_mask_BL.reshape(-1), size=len(sl.visual_index_M)).squeeze(1)
        D = embeds_BLD.shape[-1]
        embeds_TD = embeds_BLD.reshape(-1, D).index_put((pos_M,), embeds_MO.to(embeds_BLD.dtype))
        return embeds_TD.view(embeds_BLD.shape), visual_mask_BL, list(deepstack)

    def _dummy_vision_output(self, like: torch.Tensor) -> torch.Tensor:
        v = self.config.vision
        m = v.spatial_merge_size
        grid = torch.tensor([[1, m, m]])
        pixels = like.new_zeros(m * m, v.patch_dim)
        embeds_MO, deepstack_MO = self.model.visual(pixels, grid)
        return embeds_MO.sum() + sum(f.sum() for f in deepstack_MO)

    def _expert_load(self, routed: list[torch.Tensor]) -> torch.Tensor:
        E = self.config.text.num_experts
        return torch.stack([expert_counts(r.detach(), E) for r in routed])

    # ---- utilities -------------------------------------------------------------------------
    def set_attn_impl(self, impl: str) -> None:
        """The attention kernel of the decoder and the vision tower (attention.ATTN_IMPLS; auto picks
        per device and dtype at each forward)."""
        check_attn_impl(impl)
        self.model.language_model.attn_impl = impl
        self.model.visual.attn_impl = impl

    def attention_kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        """The kernel a forward on `device` in `dtype` runs (for the start-up log)."""
        return resolve_attn_impl(self.model.language_model.attn_impl, device, dtype)

    def set_activation_checkpointing(self, layers: bool | list[int], vision: bool | None = None) -> None:
        """Checkpoint the given decoder layers (True: all, False: none); vision blocks follow
        `vision` (default: on if any decoder layer is)."""
        chosen = set(range(len(self.model.language_model.layers))) if layers is True else set(layers or [])
        for i, layer in enumerate(self.model.language_model.layers):
            layer.activation_checkpointing = i in chosen
        self.model.visual.checkpoint_blocks = bool(chosen) if vision is None else vision


def shifted_labels(labels_BL: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets; in packed rows a sample's first token is never a target of the
    previous sample's last token."""
    shift = F.pad(labels_BL, (0, 1), value=IGNORE_INDEX)[:, 1:]
    if segment_ids is not None:
        crosses = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (0, 1), value=True)
        shift = shift.masked_fill(crosses, IGNORE_INDEX)
    return shift


def supervised_causal_lm_loss(
    lm_head: nn.Module,
    hidden_BLD: torch.Tensor,
    labels_BL: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    num_targets: int | None = None,
) -> torch.Tensor:
    """causal_lm_loss(lm_head(hidden), ...) for the positions that have a target, through the
    fused linear + CE of `LMHead` (qvl_train.model.loss): no rows x vocab logits are ever held,
    and with assistant-only labels most of a multimodal sequence (prompt, image tokens) is never
    projected at all."""
    return supervised_target_loss(lm_head, hidden_BLD, shifted_labels(labels_BL, segment_ids), normalizer=normalizer,
                                  num_targets=num_targets)


def supervised_target_loss(
    lm_head: nn.Module,
    hidden_BLD: torch.Tensor,
    targets_BL: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
    num_targets: int | None = None,
) -> torch.Tensor:
    """supervised_causal_lm_loss with the next-token targets already shifted (a sequence slice's
    are shifted on its whole row).

    Exactly one lm_head call whatever the targets (one ignored row when nothing is supervised),
    because under ZeRO-3 each call is a collective gather every rank must make.

    `num_targets`: the number of targets, when the caller knows it on the host (the loader
    does): the rows are then found with no host read (nonzero_static), where nonzero reads the
    count back from the device.
    """
    targets_T = targets_BL.reshape(-1)
    if num_targets is None:
        keep_T = (targets_T != IGNORE_INDEX).nonzero().squeeze(1)
    else:
        target_T = targets_T != IGNORE_INDEX
        # a wrong count would drop or repeat rows: checked on the device, with no host read
        torch._assert_async(target_T.sum() == num_targets, "num_targets does not match labels")
        keep_T = torch.nonzero_static(target_T, size=num_targets).squeeze(1)
    hidden_TD = hidden_BLD.reshape(-1, hidden_BLD.shape[-1])
    num_kept = len(keep_T)
    if num_kept == 0:
        keep_T = keep_T.new_zeros(1)  # its target is IGNORE_INDEX: zero loss, zero gradients
    total = lm_head(hidden_TD[keep_T], targets_T[keep_T])
    return total / (max(num_kept, 1) if normalizer is None else normalizer)


def causal_lm_loss(
    logits_BLV: torch.Tensor,
    labels_BL: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token CE in fp32, ignoring -100. Labels are unshifted, as in transformers. In packed
    rows the first token of a sample is never predicted from the previous sample."""
    return target_loss(logits_BLV, shifted_labels(labels_BL, segment_ids), normalizer=normalizer)


def target_loss(logits_BLV: torch.Tensor, targets_BL: torch.Tensor, *,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """causal_lm_loss with the next-token targets already shifted."""
    logits = logits_BLV.float().reshape(-1, logits_BLV.shape[-1])
    if normalizer is None:
        return F.cross_entropy(logits, targets_BL.reshape(-1), ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(logits, targets_BL.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / normalizer
