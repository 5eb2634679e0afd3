"""The tiny model's tokenizer, built in code, plus the processor config files beside it.

Design choices
- Byte-level BPE with Qwen2's exact pre-tokenizer (NFC, Qwen's split regex, ByteLevel without
  prefix space) so the tiny tokenizer behaves like the real one on whitespace, digits and
  punctuation; only the vocabulary is small.
- Exactly 1000 regular tokens (ids 0..999): the trainer's merges, topped up deterministically if
  it stops short; then Qwen's added tokens in Qwen's order from id 1000 (docs/CONTRACTS.md). Qwen3
  adds <think>/</think> after </tool_response>; they would be ids 1024/1025, past the tiny
  vocab (1024), so they are left out.
- The chat template is Qwen3-VL-Instruct's: ChatML, no default system prompt, images and videos
  as <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>, add_generation_prompt.
- Files are written by transformers' own save_pretrained (tokenizer.json, tokenizer_config.json,
  chat_template.jinja, special tokens) so AutoTokenizer loads them offline like any model dir.
- write_processor_configs() writes preprocessor_config.json / video_preprocessor_config.json with
  Qwen3-VL's values so transformers' Qwen3VLProcessor (the reference in tests) builds locally.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

NUM_REGULAR_TOKENS = 1000
TINY_VOCAB_SIZE = 1024

# Qwen2/Qwen3 added tokens in Qwen's order (151643.. in the real vocab); `True` = special.
QWEN_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),  # id 1024: dropped by the < TINY_VOCAB_SIZE rule
    ("</think>", False),
]

# Same regex as transformers' Qwen2Tokenizer (PRETOKENIZE_REGEX).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL-Instruct's chat template (behaviour copied from the published chat_template.json).
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3-VL's published image processor values; video values are transformers'
# Qwen3VLVideoProcessor class defaults (size is total pixels over all sampled frames).
IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "resample": 3,  # PIL bicubic
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65_536, "longest_edge": 16_777_216},
}
VIDEO_PROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_sample_frames": True,
    "rescale_factor": 1 / 255,
    "resample": 3,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
}


# ---- training corpus ------------------------------------------------------------------------

_COLOURS = "red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver".split()
_SHAPES = (
    "circle square triangle rectangle star hexagon pentagon oval diamond line dot cross arrow heart "
    "box ball cube cone cylinder sphere ring"
).split()
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred"
).split()
_OBJECTS = (
    "dog cat bird fish horse car bus bike tree house person man woman child people table chair cup "
    "book phone window door road sky water grass flower apple banana boat plane train clock lamp"
).split()
_VERBS = "moves jumps rolls turns falls stops appears disappears grows shrinks spins flies walks runs".split()
_POSITIONS = "left right top bottom middle center corner above below next behind front inside outside".split()
_CHAT = (
    "Hello! Hi there. How can I help you today? Please describe the image. Describe this video. "
    "Thank you. Thanks, that is helpful. You are a helpful assistant. Sure, here is the answer. "
    "I am not sure. Yes. No. Maybe. The user asks a question and the assistant answers it. "
    "Look at the picture carefully and answer with one word. Explain your reasoning step by step. "
    "What do you see? I see a small scene with simple shapes on a plain background. "
    "Count the objects, then tell me the total. Which one is the largest? Which is the smallest? "
    "Is there anything moving in the clip? The camera is still and nothing else changes. "
    "Summarize the video in one sentence. What happens first, and what happens after that? "
    "Compare the two images and list the differences. Both images show the same objects. "
    "Read the text in the image. The sign says stop. Answer the question using the image. "
    "The frame shows a bright background with a dark object near the edge of the screen."
)


def training_corpus() -> list[str]:
    """A deterministic English corpus about colours, shapes, counts, numbers, time and chat."""
    lines = [_CHAT]
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"What colour is the {shape}? The {shape} is {colour}. A {colour} {shape}.")
    for i, shape in enumerate(_SHAPES):
        n = _NUMBER_WORDS[i % len(_NUMBER_WORDS)]
        lines.append(
            f"How many {shape}s are there? There are {n} {shape}s. I count {i + 2} {shape}s in the image."
        )
        for pos in _POSITIONS:
            lines.append(f"The {shape} is on the {pos}. Where is the {shape}? It is {pos} the box.")
    for k in range(0, 200):
        t = k / 2
        lines.append(f"<{t:.1f} seconds> At {t:.1f} seconds the ball moves. The clip lasts {k} seconds.")
    for obj, verb in itertools.product(_OBJECTS, _VERBS):
        lines.append(f"The {obj} {verb} slowly. Does the {obj} move? A {obj} is visible in the frame.")
    for w in _NUMBER_WORDS:
        lines.append(f"{w} {w.capitalize()} {w}s number numbers count counting counted second seconds minute")
    return lines


# ---- tokenizer ------------------------------------------------------------------------------


def _qwen_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_bpe(corpus: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = _qwen_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_REGULAR_TOKENS,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    data = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    return dict(data["vocab"]), merges


def _pad_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], num_regular_tokens: int) -> None:
    """Top up to `num_regular_tokens` with merges of letter pairs, in a fixed order (in place);
    past those, with unreachable "[unused{i}]" entries (no merge builds them), which only pad the
    id space so Qwen's specials land at Qwen's ids in a full-size vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    letters = sorted(c for c in alphabet if c.isascii() and c.isalpha())
    for a, b in itertools.product(letters, letters):
        if len(vocab) >= num_regular_tokens:
            return
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for i in itertools.count():
        if len(vocab) >= num_regular_tokens:
            return
        vocab[f"[unused{i}]"] = len(vocab)


def build_tokenizer_object(
    *, num_regular_tokens: int = NUM_REGULAR_TOKENS, vocab_size: int = TINY_VOCAB_SIZE
) -> Tokenizer:
    """The repo's `tokenizers.Tokenizer`: `num_regular_tokens` BPE tokens, then Qwen's added
    tokens from id `num_regular_tokens` while they fit under `vocab_size` (tiny: 1000 and 1024;
    a Qwen-sized vocab: 151,643 and 151,936 put the specials at Qwen's own ids)."""
    vocab, merges = _train_bpe(training_corpus())
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("BPE trainer produced non-contiguous ids")
    _pad_vocab(vocab, merges, num_regular_tokens)
    if len(vocab) != num_regular_tokens:
        raise RuntimeError(f"expected {num_regular_tokens} regular tokens, got {len(vocab)}")
    # Byte-level BPE: no unknown token for any UTF-8 input, same model family as Qwen's own tokenizer.
    tok = _qwen_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)))
    for text, special in QWEN_ADDED_TOKENS:
        if tok.get_vocab_size(with_added_tokens=True) >= vocab_size:
            break
        # Added one at a time so each id is exactly the next one (Qwen's order is the id order).
        tok.add_tokens([AddedToken(text, special=special, normalized=False, single_word=False)])
    return tok


def build_tiny_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Build the tiny tokenizer and save it as standard HF tokenizer files in `out_dir`."""
    return build_tokenizer(out_dir)


def build_tokenizer(
    out_dir: str | os.PathLike, *, num_regular_tokens: int = NUM_REGULAR_TOKENS, vocab_size: int = TINY_VOCAB_SIZE
) -> Path:
    """Save the repo tokenizer (sizes as in build_tokenizer_object) as standard HF tokenizer files."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = [t for t, special in QWEN_ADDED_TOKENS[:14] if special]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(num_regular_tokens=num_regular_tokens, vocab_size=vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=specials,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    hf.chat_template = QWEN3_VL_CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    _mark_tokenizer_class(out / "tokenizer_config.json")
    # transformers 5 no longer writes this file; older loaders and other tools still read it.
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": specials}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out


def _mark_tokenizer_class(path: Path) -> None:
    # Qwen2Tokenizer, as the real Qwen3-VL dirs name it, so AutoTokenizer builds the same class.
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_processor_configs(
    out_dir: str | os.PathLike, *, image: dict | None = None, video: dict | None = None
) -> tuple[Path, Path]:
    """Write preprocessor_config.json and video_preprocessor_config.json (overrides merged in)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, base, extra in (
        ("preprocessor_config.json", IMAGE_PROCESSOR_CONFIG, image),
        ("video_preprocessor_config.json", VIDEO_PROCESSOR_CONFIG, video),
    ):
        cfg = {**base, **(extra or {})}
        (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        paths.append(out / name)
    return paths[0], paths[1]


def load_tokenizer(model_dir: str | os.PathLike):
    """AutoTokenizer from a local model dir, never touching the network."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
