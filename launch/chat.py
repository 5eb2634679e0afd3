"""Chat with, or evaluate, an exported checkpoint (a Hub-format dir: our export or the Hub's).

    python launch/chat.py --model runs/<run>/export --image data/vqa_demo/images/eval_colour_0000.png "What colour is the shape?"
    python launch/chat.py --model runs/<run>/export --eval data/vqa_demo/eval.jsonl   # exact match per question
    python launch/chat.py --model runs/<run>/export --eval data/vqa_demo/eval.jsonl --backend transformers

--backend native (default): prompts go through the training pipeline (qvl_train.data.encode_sample)
into our model, so the model sees exactly the token layout, pixel budget and positions it was
trained on; the media budgets are the export's processor files (written from the training run),
or a data config given with --data-config.
--backend transformers: transformers' own processor, model and generate on the export (PeftModel
on its base for an adapter dir), nothing of ours in between: what a serving stack sees
(qvl_train.train.hf_eval; video needs torchvision there).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvl_train.checkpoint import serving  # noqa: E402
from qvl_train.data import encode_sample, load_data_config, load_tokenizer  # noqa: E402
from qvl_train.model import from_pretrained, generate  # noqa: E402
from qvl_train.train import hf_eval  # noqa: E402
from qvl_train.train.evaluate import split_prompts  # noqa: E402

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def prompt_batch(sample: dict, tokenizer, base_dir: str, media: dict) -> tuple[dict, list[int]]:
    """Encode a conversation whose last turn is the assistant's; the prompt is everything before
    the answer's first trained token, the reference the answer's tokens."""
    enc = encode_sample(sample, tokenizer=tokenizer, base_dir=base_dir, **media)
    batch = {k: enc[k][None] for k in ("input_ids", "labels", "attention_mask")}
    batch.update({k: enc.get(k) for k in MEDIA_KEYS})
    gen, refs = split_prompts(batch, tokenizer.pad_token_id)
    return gen, refs[0]


def answer(model, tokenizer, gen: dict, max_new_tokens: int, do_sample: bool) -> str:
    eos = model.config.text.eos_token_id
    out = generate(model, **gen, max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos)
    new = out[0, gen["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def chat(args, model, tokenizer, media) -> None:
    content = [{"type": "image", "image": str(Path(p).resolve())} for p in args.image]
    content += [{"type": "video", "video": str(Path(p).resolve())} for p in args.video]
    content.append({"type": "text", "text": args.question})
    # encode_sample wants a finished conversation: a placeholder answer marks where the reply starts
    sample = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "."}]}
    gen, _ = prompt_batch(sample, tokenizer, ".", media)
    print(answer(model, tokenizer, gen, args.max_new_tokens, args.sample))


def _question(sample: dict) -> str:
    return next(c["text"] for m in sample["messages"] if m["role"] == "user"
                for c in (m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])
                if c["type"] == "text")


def evaluate(args, model, tokenizer, media) -> None:
    per_question = collections.defaultdict(lambda: [0, 0])
    path = Path(args.eval)
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        gen, ref_ids = prompt_batch(sample, tokenizer, str(path.parent), media)
        pred = answer(model, tokenizer, gen, args.max_new_tokens, False)
        ref = tokenizer.decode(ref_ids, skip_special_tokens=True).strip()
        per_question[_question(sample)][0] += pred.lower() == ref.lower()
        per_question[_question(sample)][1] += 1
    report(per_question)


def report(per_question: dict, skipped_videos: int = 0) -> None:
    total = [sum(v[i] for v in per_question.values()) for i in (0, 1)]
    for q, (right, n) in sorted(per_question.items()):
        print(f"{right:5d}/{n:<5d} {right / n:6.1%}  {q}")
    if skipped_videos:
        print(f"{skipped_videos} video samples not scored: transformers' video processor needs torchvision")
    print(f"{total[0]:5d}/{total[1]:<5d} {total[0] / max(total[1], 1):6.1%}  exact match overall")


def evaluate_transformers(args) -> None:
    """The same report, scored by transformers alone on the export (qvl_train.train.hf_eval)."""
    cuda = torch.cuda.is_available()
    model = hf_eval.load_model(args.model, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    processor = hf_eval.load_processor(args.model)
    path = Path(args.eval)
    per_question, skipped = collections.defaultdict(lambda: [0, 0]), 0
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        result = hf_eval.score(model, processor, [(sample, str(path.parent))], max_new_tokens=args.max_new_tokens)
        skipped += result.skipped_videos
        if result.scored:
            per_question[_question(sample)][0] += result.correct
            per_question[_question(sample)][1] += 1
    report(per_question, skipped)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hub-format model dir (with tokenizer)")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--video", action="append", default=[])
    p.add_argument("--eval", help="a JSONL of conversations: exact match of the last answer")
    p.add_argument("--data-config", help="configs/data/NAME.yaml for the media budgets (default: the export's "
                   "processor files, which the training run wrote)")
    p.add_argument("--backend", choices=["native", "transformers"], default="native",
                   help="native: our model and data pipeline; transformers: transformers alone on the export")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("question", nargs="?")
    args = p.parse_args(argv)
    if (args.eval is None) == (args.question is None):
        p.error("give a question, or --eval FILE")
    if args.backend == "transformers":
        if not args.eval:
            p.error("--backend transformers scores --eval FILE")
        return evaluate_transformers(args)
    if hf_eval.is_adapter(args.model):
        p.error("--backend native needs a full checkpoint; merge the adapter with launch/export.py, or use "
                "--backend transformers (PeftModel on the base)")
    model = from_pretrained(args.model, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                            device="cuda" if torch.cuda.is_available() else "cpu").eval()
    tokenizer = load_tokenizer(args.model)
    if args.data_config:
        media = load_data_config(args.data_config).media_options()
        media.pop("max_length", None)
    else:  # the export's processor files: the training run's media settings
        media = {"media_config": serving.media_from_export(args.model)}
    (evaluate if args.eval else chat)(args, model, tokenizer, media)


if __name__ == "__main__":
    main()
