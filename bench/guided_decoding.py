#!/usr/bin/env python3
"""Per-step CPU cost of the VLM's guided-JSON logits processor, before and after, in one run.

On a GPU the processor runs on the CPU once per decode step, between two forward passes, so its
cost per step is added to every step of a batch. Measured here for each engine on vlm_analyze's
real-profile schema (the larger of the two), at a real VLM's vocabulary and batch 1, 16 and 64:

- ours: the character automaton stages/guided_json.py held until commit BEFORE_COMMIT (read from
  git history, so the before figure comes from the same run);
- llguidance: what stages/guided_json.py uses now (its JsonLogitsProcessor, as the VLM calls it);
- xgrammar: its own transformers integration (xgrammar.contrib.hf.LogitsProcessor), and its
  BatchGrammarMatcher, which fills a batch's masks in parallel;
- outlines: outlines' processor on its default JSON-schema backend, outlines-core (a regex DFA
  index over the whole vocabulary, built once per schema).

The vocabulary: no model hub is reachable here and no installed package ships a tokenizer of that
size, so a byte-level BPE of Qwen2's size (151,643 tokens plus specials; logits padded to 151,936
as Qwen2's output layer is) is built in the process: the 256 byte symbols, then tokens grown one
symbol at a time from English-like letter frequencies and JSON punctuation, each merge joining an
existing token and a symbol. Every row writes a different schema-valid answer (seeded), as the
model would, then ends and is padded the way transformers' generate pads a finished row. The
scores of each step are fresh random logits; only the processor call is timed. Each engine's mask
is also checked to allow every token of the answers (a wrong mask would count as a violation).

    .venv/bin/python bench/guided_decoding.py [--batches 1,16,64] [--skip outlines]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from stages import guided_json as gj  # noqa: E402
from stages import vlm  # noqa: E402

BEFORE_COMMIT = "7867fd1"  # the last commit with the automaton in stages/guided_json.py
TOKENIZER_SIZE = 151_643
LOGITS_WIDTH = 151_936
WORDS = ("a red sneaker on a white table in soft light with a clean background sharp product shot "
         "bottle of sparkling lemon water condensation drops cold fresh summer blue green yellow "
         "black grey orange purple pink brown text is readable centred well lit studio").split()


# --- the vocabulary -------------------------------------------------------------------------------

def big_tokenizer(size: int = TOKENIZER_SIZE, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    letters = list("etaoinshrdlucmfwypvbgkjqxz")
    weights = [12, 9, 8, 7, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    punctuation = [c.replace(" ", "Ġ") for c in '{}[]":,. 0123456789-\'!?']
    grown = list(vocab)
    while len(vocab) < size:
        r = rng.random()
        if r < 0.8:
            base = grown[rng.randrange(len(alphabet), len(grown))] if len(grown) > len(alphabet) else "Ġ"
        else:
            base = rng.choice(alphabet) if r > 0.95 else rng.choice(["Ġ", *letters])
        symbol = rng.choices(letters, weights)[0] if rng.random() < 0.9 else rng.choice(punctuation)
        token = base + symbol
        if token in vocab or len(token) > 16:
            continue
        vocab[token] = len(vocab)
        merges.append((base, symbol))
        grown.append(token)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>"]})
    return tokenizer


# --- answers --------------------------------------------------------------------------------------

def answer(node: Any, rng: random.Random) -> Any:
    if isinstance(node, gj.Str):
        text = ""
        limit = rng.randint(max(node.min_len, 3), node.max_len)
        while True:
            word = rng.choice(WORDS)
            if len(text) + len(word) + 1 > limit:
                return text or word[: node.max_len]
            text = f"{text} {word}" if text else word
    if isinstance(node, gj.Enum):
        return rng.choice(node.values)
    if isinstance(node, gj.Bool):
        return rng.random() < 0.5
    if isinstance(node, gj.Int):
        return rng.randint(node.lo, node.hi)
    if isinstance(node, gj.Array):
        return [answer(node.item, rng) for _ in range(rng.randint(max(1, node.min_items), node.max_items))]
    if isinstance(node, gj.Object):
        return {key: answer(child, rng) for key, child in node.fields}
    raise TypeError(node)


def answers(tokenizer, schema, count: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        text = json.dumps(answer(schema, rng), separators=(",", ":"))
        gj.parse_strict(text, schema)
        rows.append(tokenizer.encode(text, add_special_tokens=False))
    return rows


# --- engines -----------------------------------------------------------------------------------------
# Each builds, once, what a worker keeps per schema, and returns two factories for one generate
# call: the logits processor as generate calls it, and its mask computation alone (following the
# rows' tokens and computing what each may write next, without touching the scores). On a GPU
# the scores are masked on the GPU, so the second is what the CPU pays per decode step there.

class Engine:
    def __init__(self, processor: Callable[[], Callable], masks: Callable[[], Callable]):
        self.processor, self.masks = processor, masks


def _before_module():
    """stages/guided_json.py as it was, from git history, under another module name."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:stages/guided_json.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"the automaton is read from git history ({BEFORE_COMMIT}), not available here: {exc}")
    spec = importlib.util.spec_from_loader("guided_json_before", loader=None)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up there
    exec(compile(source, "guided_json_before", "exec"), old.__dict__)
    return old


def engine_ours(tokenizer, schema, eos: list[int]) -> Engine:
    old = _before_module()

    def convert(node):
        if isinstance(node, gj.Object):
            return old.Object(tuple((k, convert(v)) for k, v in node.fields))
        if isinstance(node, gj.Array):
            return old.Array(convert(node.item), node.max_items, node.min_items)
        if isinstance(node, gj.Str):
            return old.Str(node.max_len, node.min_len)
        if isinstance(node, gj.Enum):
            return old.Enum(node.values)
        if isinstance(node, gj.Int):
            return old.Int(node.lo, node.hi)
        return old.Bool()

    texts = old.token_texts(tokenizer)
    texts += [None] * (LOGITS_WIDTH - len(texts))
    guide = old.JsonGuide(texts, convert(schema), eos)

    class Masks(old.JsonLogitsProcessor):
        """The old processor's __call__ up to its boolean mask (which it then applied with masked_fill)."""

        def __call__(self, input_ids):
            batch = input_ids.shape[0]
            if self.states is None:
                self.states = [self.guide.initial] * batch
                self.start = self.seen = input_ids.shape[1]
            new = input_ids[:, self.seen:].tolist()
            self.seen = input_ids.shape[1]
            for r in range(batch):
                for token in new[r]:
                    state = self.states[r]
                    if not state:
                        break
                    text = self.guide.texts[token] if token < self.guide.vocab_size else None
                    self.states[r] = old.feed(state, text) if text else None
            allowed = torch.zeros((batch, LOGITS_WIDTH), dtype=torch.bool)
            self.guide.fill(self.states, allowed)
            return allowed

    return Engine(lambda: old.JsonLogitsProcessor(guide), lambda: Masks(guide))


def engine_llguidance(tokenizer, schema, eos: list[int]) -> Engine:
    guide = gj.JsonGuide(gj.GuideTokenizer(tokenizer, LOGITS_WIDTH, eos), schema)
    return Engine(lambda: gj.JsonLogitsProcessor(guide), lambda: gj.JsonLogitsProcessor(guide).masks)


def _xgrammar_compiled(tokenizer, schema, eos):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=LOGITS_WIDTH, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info)
    return compiler.compile_json_schema(json.dumps(gj.json_schema(schema)), any_whitespace=False,
                                        separators=(",", ":"), strict_mode=True)


class XgrammarMasks:
    """xgrammar's matchers for a batch, filled one row at a time (as its contrib.hf processor does)
    or all at once by its BatchGrammarMatcher."""

    def __init__(self, compiled, batched: bool):
        self.compiled, self.batched = compiled, batched
        self.matchers = None

    def __call__(self, input_ids):
        import xgrammar as xgr

        batch = input_ids.shape[0]
        if self.matchers is None:
            self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(batch)]
            self.bitmask = xgr.allocate_token_bitmask(batch, LOGITS_WIDTH)
            self.batcher = xgr.BatchGrammarMatcher() if self.batched else None
        else:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist()):
                if not matcher.is_terminated():
                    matcher.accept_token(token)
        # A terminated matcher refuses to fill; its row keeps the mask that allowed the end.
        live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
        if self.batcher is not None and live:
            self.batcher.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self.bitmask, live)
        else:
            for i in live:
                self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        return self.bitmask


class XgrammarProcessor(XgrammarMasks):
    def __call__(self, input_ids, scores):
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(scores, super().__call__(input_ids))
        return scores


def engine_xgrammar_hf(tokenizer, schema, eos: list[int]) -> Engine:
    import xgrammar as xgr

    compiled = _xgrammar_compiled(tokenizer, schema, eos)
    return Engine(lambda: xgr.contrib.hf.LogitsProcessor(compiled), lambda: XgrammarMasks(compiled, batched=False))


def engine_xgrammar_batch(tokenizer, schema, eos: list[int]) -> Engine:
    compiled = _xgrammar_compiled(tokenizer, schema, eos)
    return Engine(lambda: XgrammarProcessor(compiled, batched=True), lambda: XgrammarMasks(compiled, batched=True))


def engine_outlines(tokenizer, schema, eos: list[int]) -> Engine:
    from outlines.backends.outlines_core import OutlinesCoreBackend, OutlinesCoreLogitsProcessor
    from outlines.models.transformers import TransformerTokenizer
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask

    wrapped = TransformerTokenizer(tokenizer)
    vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
        tokenizer.get_vocab(), tokenizer.eos_token_id, tokenizer.eos_token, wrapped.convert_token_to_string)
    regex = build_regex_from_schema(json.dumps(gj.json_schema(schema)), whitespace_pattern="")
    index = Index(regex, vocabulary)

    class Masks:
        """What OutlinesCoreLogitsProcessor.process_logits does before it applies each row's mask."""

        def __init__(self):
            self.guides = None

        def __call__(self, input_ids):
            if self.guides is None:
                self.guides = [Guide(index) for _ in range(input_ids.shape[0])]
                self.masks = [allocate_token_bitmask(LOGITS_WIDTH) for _ in self.guides]
            else:
                for guide, token in zip(self.guides, input_ids[:, -1].tolist()):
                    if not guide.is_finished() or guide.accepts_tokens([token]):
                        guide.advance(token_id=token, return_tokens=False)
            for guide, mask in zip(self.guides, self.masks):
                fill_next_token_bitmask(guide, mask)
            return self.masks

    return Engine(lambda: OutlinesCoreLogitsProcessor(index, "torch"), Masks)


ENGINES: dict[str, tuple[str, Callable[..., Engine]]] = {
    "ours": ("ours (automaton, before)", engine_ours),
    "llguidance": ("llguidance (after)", engine_llguidance),
    "xgrammar-hf": ("xgrammar, contrib.hf", engine_xgrammar_hf),
    "xgrammar-batch": ("xgrammar, BatchGrammarMatcher", engine_xgrammar_batch),
    "outlines": ("outlines (outlines-core)", engine_outlines),
}


# --- the decode loop --------------------------------------------------------------------------------

def _chosen(rows: list[list[int]], t: int, eos: int, pad: int) -> list[int]:
    return [r[t] if t < len(r) else (eos if t == len(r) else pad) for r in rows]


def run(make_processor, rows: list[list[int]], eos: int, pad: int, seed: int = 2) -> tuple[float, int]:
    """(median seconds per processor call, mask violations) over one simulated generate."""
    batch = len(rows)
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, LOGITS_WIDTH, generator=generator)
    ids = torch.zeros(batch, 4, dtype=torch.long)  # the prompt
    processor = make_processor()
    times, violations = [], 0
    for t in range(max(len(r) for r in rows) + 1):
        scores = base.clone()
        started = time.perf_counter()
        masked = processor(ids, scores)
        times.append(time.perf_counter() - started)
        chosen = _chosen(rows, t, eos, pad)
        violations += sum(1 for b, token in enumerate(chosen)
                          if t <= len(rows[b]) and not torch.isfinite(masked[b, token]))
        ids = torch.cat([ids, torch.tensor(chosen).unsqueeze(1)], 1)
    return statistics.median(times), violations


def run_masks(make_masks, rows: list[list[int]], eos: int, pad: int) -> float:
    """Median seconds per step of the mask computation alone."""
    ids = torch.zeros(len(rows), 4, dtype=torch.long)
    masks = make_masks()
    times = []
    for t in range(max(len(r) for r in rows) + 1):
        started = time.perf_counter()
        masks(ids)
        times.append(time.perf_counter() - started)
        ids = torch.cat([ids, torch.tensor(_chosen(rows, t, eos, pad)).unsqueeze(1)], 1)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--skip", default="", help="comma-separated engines to leave out: " + ", ".join(ENGINES))
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine and batch; the fastest is kept")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: 1 by default, since on a shared machine OpenMP's barriers, not the "
                             "work, decide what a multi-threaded masked_fill costs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    started = time.perf_counter()
    tokenizer = big_tokenizer()
    print(f"vocabulary: synthetic byte-level BPE, {len(tokenizer):,} tokens, logits width {LOGITS_WIDTH:,} "
          f"(built in {time.perf_counter() - started:.1f} s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; python {platform.python_version()}")
    schema = vlm.ANALYZE_SCHEMAS["real"]
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|> ends a chat turn, <|endoftext|> a text
    rows = answers(tokenizer, schema, max(batches))
    print(f"schema: vlm_analyze (real profile); answers of {min(map(len, rows))}-{max(map(len, rows))} tokens\n")

    versions = {}
    for name in ("llguidance", "xgrammar", "outlines", "outlines_core", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")

    header = ("| engine | setup s | " + " | ".join(f"batch {b}: processor ms/step" for b in batches) + " | "
              + " | ".join(f"batch {b}: masks only ms/step" for b in batches) + " | violations |")
    lines = [header, "|" + "---|" * (2 * len(batches) + 3)]
    for key, (label, build) in ENGINES.items():
        if key in skip:
            continue
        began = time.perf_counter()
        try:
            engine = build(tokenizer, schema, eos)
        except Exception as exc:  # an engine that cannot run here is reported, not hidden
            lines.append(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:120]} |")
            print(lines[-1], flush=True)
            continue
        setup = time.perf_counter() - began
        full, alone, bad = [], [], 0
        for batch in batches:
            runs = [run(engine.processor, rows[:batch], eos[0], tokenizer.pad_token_id) for _ in range(args.repeat)]
            full.append(f"{min(r[0] for r in runs) * 1e3:.2f}")
            bad += sum(r[1] for r in runs)
            best = min(run_masks(engine.masks, rows[:batch], eos[0], tokenizer.pad_token_id) for _ in range(args.repeat))
            alone.append(f"{best * 1e3:.2f}")
        lines.append(f"| {label} | {setup:.1f} | " + " | ".join(full) + " | " + " | ".join(alone) + f" | {bad} |")
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    print("\nsetup: the engine's per-process preparation of the vocabulary plus compiling this schema. "
          "processor: the logits processor as generate calls it, on CPU scores. masks only: following the "
          "rows and computing their masks, without applying them (what the CPU pays per step when the "
          "scores are on a GPU). violations: answer tokens a mask refused (must be 0).")


if __name__ == "__main__":
    main()
