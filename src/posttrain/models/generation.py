"""Sample completions for a list of prompts with Hugging Face `generate` (KV cache, left padding).

Small on purpose: `posttrain generate`, evaluation and the quickstart's before/after table use it. The RL
rollout engine (batched sampling that yields training batches with log-probabilities) is a separate module; both
build their generation settings from scratch (`model_generation_defaults_off`, `plain_generation_config`,
`sampling_processors`), so that no field of a model's `generation_config.json` (a repetition penalty, top-k,
suppressed tokens, a minimum length, ...) changes what is sampled: greedy is the argmax of the logits, and
sampling at temperature T with nucleus `top_p` draws from top-p(softmax(logits / T)) and nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from posttrain.data.render import answer_scaffold, chat_text, end_of_turn_ids, marker_problems, strip_scaffold
from posttrain.errors import UserError
from posttrain.models.adapters import merged_for_sampling
from posttrain.models.loading import context_length
from posttrain.models.prefix_sharing import slot_distances

Prompt = str | Sequence[dict]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model sees: the chat template with the generation prompt (the assistant turn's header).

    A string is one user message. A tokenizer without a chat template (a base model) gets the fallback template
    training renders with (`data.render.chat_text`), so a model is sampled on the format it was trained on.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return chat_text(tokenizer, messages, add_generation_prompt=True)


def check_room(model, lengths: list[int], max_new_tokens: int) -> None:
    """Refuse a request whose longest prompt (`lengths`: each rendered prompt's tokens) plus `max_new_tokens`
    passes the model's context (`models.loading.context_length`), before anything is decoded: past it, learned
    position embeddings fail with an index error and rotary ones decode at positions the model never trained on,
    silently. Training refuses the same rows (`algorithm.rollout.max_new_tokens` after a prompt,
    `train._check_context`)."""
    config = getattr(model, "config", None)
    if config is None or not lengths:
        return
    context = context_length(config.get_text_config() if hasattr(config, "get_text_config") else config)
    if context is None:
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens <= context:
        return
    which = f"prompt {longest + 1} of {len(lengths)}" if len(lengths) > 1 else "the prompt"
    fix = (f"ask for at most {context - lengths[longest]} new tokens" if lengths[longest] < context else
           "shorten that prompt: it fills the context alone")  # fmt: skip
    raise UserError(
        f"{max_new_tokens} new tokens (max_new_tokens; --max-new-tokens on the command line) after {which}, "
        f"{lengths[longest]} tokens with the chat template, pass the model's context of {context} positions: "
        f"{fix}"
    )


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS, the model's generation_config EOS id(s), and the
    end-of-turn token its chat template closes an assistant turn with (what SFT trains the model to stop with,
    `data.render.end_of_turn_ids`)."""
    ids: set[int] = set(end_of_turn_ids(tokenizer))
    for value in (
        tokenizer.eos_token_id,
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return sorted(ids)


@contextmanager
def model_generation_defaults_off(model) -> Iterator[None]:
    """While inside, the model's own generation config is a fresh, empty `GenerationConfig`.

    transformers' `generate` (5.x, `_prepare_generation_config`) fills every field of the config it is given that
    is None from `model.generation_config` (the model's `generation_config.json`, custom entries included), then
    from fixed global defaults. Fields such as `suppress_tokens`, `bad_words_ids`, `sequence_bias`, `min_p` or
    `forced_eos_token_id` switch a logits processor on by being set at all, so no neutral value can be passed for
    them: the only way to keep a model's choices out is to hide them. The global defaults left are neutral except
    `top_k` (50), which `plain_generation_config` sets to 0. Works through a peft wrapper (whose
    `generation_config` is the base model's).
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def kept_in_float32(model, dtype: torch.dtype):
    """The parameters transformers keeps in float32 when it loads `model` in `dtype`, as a pattern searched in a
    parameter's dotted name (None: none): a model's `_keep_in_fp32_modules_strict` under bfloat16 and float16, its
    `_keep_in_fp32_modules` under float16 only, each entry a pattern searched anywhere in the name with `*` as any
    text, as transformers 5's loader reads them from 5.1 on (`modeling_utils._get_dtype_plan`, `build_glob_alternation`;
    5.0 kept `_keep_in_fp32_modules` under bfloat16 too, hence transformers>=5.1). So
    DeepSeek-V3's ``gate.weight`` keeps ``model.layers.0.mlp.gate.weight``, and gpt-oss's float16-only norms are
    cast to bfloat16. A LoRA-wrapped layer's weight (peft's ``.base_layer.``) is matched by the layer's name.

    >>> class M(torch.nn.Module):
    ...     _keep_in_fp32_modules, _keep_in_fp32_modules_strict = ["norm"], ["gate.weight"]
    >>> kept_in_float32(M(), torch.bfloat16).pattern, kept_in_float32(M(), torch.float16).pattern
    ('gate.weight', 'gate.weight|norm')
    """
    found: set[str] = set()
    for module in model.modules():
        found.update(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            found.update(getattr(module, "_keep_in_fp32_modules", None) or ())
    return re.compile("|".join(p.replace("*", ".*") for p in sorted(found))) if found else None


@contextmanager
def weights_in(model, dtype: torch.dtype | None) -> Iterator[int]:
    """While sampling (no gradients): each floating-point parameter of `model` not already in `dtype` swapped for a
    `dtype` copy, and the original tensors put back untouched on exit (`algorithm.rollout.dtype`). One copy per
    tensor, so tied weights (an output layer that shares the embedding matrix) stay tied. Buffers are kept as they
    are: a model's rotary frequencies stay in float32, and its rotary embedding casts cos and sin to the
    activations' dtype itself. So are the parameters transformers keeps in float32 when it loads the model in
    `dtype` (`kept_in_float32`: a MoE router's gate), which the model's own code casts around. The copies cost the
    weights' size in `dtype` while sampling (0.27 GB for the embedded model in bfloat16), freed after. Yields how
    many parameters it swapped (0 when `dtype` is None)."""
    if dtype is None:
        yield 0
        return
    keep = kept_in_float32(model, dtype)
    copies: dict[int, torch.nn.Parameter] = {}
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        with torch.no_grad():
            for path, module in model.named_modules():
                for name, p in list(module._parameters.items()):
                    if p is None or not p.is_floating_point() or p.dtype == dtype:
                        continue
                    if keep is not None and keep.search(f"{path}.{name}".replace(".base_layer.", ".")):
                        continue
                    if id(p) not in copies:
                        copies[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    swapped.append((module, name, p))
                    module._parameters[name] = copies[id(p)]
        yield len(copies)
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


def plain_generation_config(
    *, max_new_tokens: int, sample: bool, eos: list[int], pad_id: int, stop_strings: list[str] | None = None
):
    """A `GenerationConfig` that turns on no logits processor: greedy, or sampling from softmax(logits) as is.

    Temperature and top-p are not set here (they stay 1): pass `sampling_processors(...)` to `generate` as
    `logits_processor`, so that they are the only processors (and the rollout engine can put its recorder after
    them). Use inside `model_generation_defaults_off`, or the model's own settings fill what is left unset.
    """
    from transformers import GenerationConfig

    # greedy (`RowStreams` forcing the drawn token is greedy too): no sampling settings, which transformers warns
    # about when set without do_sample
    warpers = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {}  # top_k: the global default is 50
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        **warpers,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
        use_cache=True,
        stop_strings=list(stop_strings) if stop_strings else None,
    )


def sampling_processors(temperature: float, top_p: float) -> list:
    """transformers' temperature and nucleus warpers, in that order (top-p applies to softmax(logits / T)).

    >>> [type(p).__name__ for p in sampling_processors(0.7, 0.9)], sampling_processors(1.0, 1.0)
    (['TemperatureLogitsWarper', 'TopPLogitsWarper'], [])
    """
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


class RowStreams:
    """A logits processor, placed last: draws each row's token from that row's own random stream, then leaves
    that token the only possible one, so `generate`'s greedy pick (argmax) returns it.

    The draw is the inverse CDF of the row's distribution (the scores the earlier processors made, e.g. after
    temperature and top-p) at one uniform number from the row's `torch.Generator`: an exact sample of
    softmax(scores), as `generate`'s multinomial draw is. What changes is whose random numbers a row uses: its
    own, seeded from the caller's seed (a rollout's, `generate`'s) and the row's index, instead of one stream shared by
    the batch. So a row's
    samples do not depend on which other rows are in the batch (they do on the row's index: another order of the
    same prompts draws other samples), which lets finished rows leave it
    (`models.generation.sample_groups`) and gives the same samples whatever `rollout.generation_batch_size` is.
    `ids`, when given, number the streams instead of their positions: an RL rollout split over processes numbers
    each row by its place in the whole rollout, so a row draws the same whatever the number of processes.
    `rows` is the index of each batch row among the streams (updated as rows leave).
    """

    def __init__(self, seed: int, count: int, ids: list[int] | None = None) -> None:
        if ids is not None and len(ids) != count:
            raise ValueError(f"{len(ids)} stream ids for {count} rows")
        self.streams = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in (ids or range(count))]
        self.rows = list(range(count))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(-1)  # (b, V)
        u = torch.cat([torch.rand(1, generator=self.streams[r]) for r in self.rows]).to(cdf.device)
        # the first token whose cumulative probability exceeds u x total: never a token of probability 0
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, pick, 0.0)


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    stop: list[str] | None = None,
    seed: int | None = None,
    progress: str | None = None,
    merge_adapters: bool | None = None,
    finished: list[bool] | None = None,
) -> list[str]:
    """Complete each prompt; returns the decoded completions (no prompt, no special tokens, and not the scaffold
    the chat template writes before every answer: `data.render.answer_scaffold`), in prompt order.

    Greedy when `temperature == 0`, else sampling from top-p(softmax(logits / temperature)); nothing of the
    model's own `generation_config.json` applies (`model_generation_defaults_off`). Each
    completion ends at the first EOS token or at the first of the `stop` strings (the stop string is cut off).
    `seed` makes sampling repeatable without touching the caller's global RNG state; each prompt draws from its own
    stream (`RowStreams`), seeded from `seed` and its position in `prompts`: its sample does not depend on the batch size
    or on the prompts after it, but it does on its position (drop or reorder earlier prompts and it draws another
    sample, from the same distribution). The first call with a new
    set of stop strings costs a few seconds on a large vocabulary (transformers precomputes a table, then caches it).
    `progress`, when given, is the label of a progress bar on stderr that counts prompts, batch by batch.
    `merge_adapters`: decode a LoRA model from merged copies of its adapted weights (`adapters.merged_for_sampling`:
    one product per adapted layer instead of three; the same model up to float rounding, one copy of the adapted
    weights held while decoding); None, the default, merges on a CPU, where peft's small adapter products cost
    ~12% of a decode (the rollout engine's `algorithm.rollout.merge_adapters` rule). A model that cannot be
    merged (QLoRA, adapters disabled) decodes through its adapters either way.
    `finished`, when given (an empty list), receives for each prompt whether its answer ended (an EOS or end-of-turn
    token, or a stop string) rather than being cut at `max_new_tokens`.
    """
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    # text in chat-template form would be wrapped in the template again (file rows are checked with their lines
    # before the model loads where the caller can: `data.render.refuse_markers`)
    for i, p in enumerate(prompts):
        if found := marker_problems(tokenizer, [{"prompt": p}], source=f"prompt {i + 1} of {len(prompts)}"):
            raise UserError(f"{found[0].file}: {found[0].message}")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # each prompt's tokens, unpadded
    check_room(model, [len(x) for x in ids], max_new_tokens)
    scaffold = answer_scaffold(tokenizer)  # what the template writes before every answer (Qwen3's empty think)
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = temperature > 0
    # Stop decoding a row as soon as it contains a stop string (saves the tokens after it); the text is still
    # cut below, since the matched string itself must go.
    # Sampling draws each prompt's tokens from its own random stream (`RowStreams`, seeded from `seed` and the
    # prompt's index): the same seed gives the same sample of a prompt whatever the batch size and whatever other
    # prompts are in its batch (one stream for the batch made `evaluate --n 3` and `--n 6` sample the same first
    # three prompts differently). `generate`'s own pick is then greedy over the one token the stream left.
    gen_cfg = plain_generation_config(
        max_new_tokens=max_new_tokens, sample=False, eos=eos, pad_id=pad_id, stop_strings=stop
    )
    streams = None
    if sampling:
        if seed is None:  # from the caller's random state, which is left as it was
            with torch.random.fork_rng(devices=[]):
                seed = int(torch.randint(2**31 - 1, ()))
        streams = RowStreams(seed, len(texts))
    processors = LogitsProcessorList([*sampling_processors(temperature, top_p), streams] if sampling else [])
    # Longest prompts first, batched by similar length: less padding per batch. Results go back in order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    results: list[str] = [""] * len(texts)
    ended = [False] * len(texts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bar = tqdm(total=len(texts), desc=progress, unit="prompt", dynamic_ncols=True, file=sys.stderr,
               disable=progress is None)  # fmt: skip
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.no_grad(),
            model_generation_defaults_off(model),
            merged_for_sampling(model) if (device.type == "cpu" if merge_adapters is None else merge_adapters)
            else contextlib.nullcontext(),
        ):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                if streams is not None:
                    streams.rows = list(idx)  # each row's own stream, by its prompt's index
                if sampling or stop:  # one `generate` call per batch (see `greedy_decode` for why)
                    # Left padding: every prompt ends at the same position, so new tokens go in one column.
                    enc = tokenizer(
                        [texts[i] for i in idx], return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False,
                    ).to(device)  # fmt: skip
                    out = model.generate(
                        **enc, generation_config=gen_cfg, logits_processor=processors, tokenizer=tokenizer
                    )  # (b, prompt_len + new)
                    new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
                else:
                    new_tokens = greedy_decode(model, [ids[i] for i in idx], gen_cfg, eos, pad_id)
                for i, row in zip(idx, new_tokens):
                    kept = _until_eos(row, eos)
                    raw = tokenizer.decode(kept, skip_special_tokens=True)
                    text = _cut(raw, stop)
                    results[i] = strip_scaffold(text, scaffold)
                    ended[i] = len(kept) < len(row) or text != raw  # an EOS (padding after it), or a stop string
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    if finished is not None:
        finished[:] = ended
    return results


SEGMENT_TOKENS = 8
"""Greedy decoding runs `generate` this many new tokens at a time; between two calls, the rows that have finished
leave the batch (`greedy_decode`)."""


def greedy_decode(model, rows: list[list[int]], gen_cfg, eos: list[int], pad_id: int) -> list[list[int]]:
    """Greedy completions of a batch of prompts (`rows`: each prompt's token ids, unpadded): each row's new token
    ids, at most `gen_cfg.max_new_tokens`, padding after its EOS (as one `generate` call returns them).

    Two savings over one `generate` call on the left-padded batch, neither of which changes what a row computes
    (its own prompt tokens at the same positions, its own tokens, attention over the same keys):

    - the tokens every prompt starts with (a chat template's system prompt and the instructions the prompts
      share) are encoded once, and their KV cache is copied to every row. The rows' other tokens follow,
      left-padded: the padding sits between the shared prefix and each row's own tokens, masked out, and the
      positions come from the attention mask, so every token keeps the position it has in its prompt;
    - a row that has generated an EOS token leaves the batch and its KV cache. One `generate` call decodes every
      row until the last one ends, so a batch of b rows costs b x its longest completion; here it costs about
      the tokens its rows generate (plus up to `SEGMENT_TOKENS` - 1 per row, and one copy of the cache per
      segment in which rows finished): `generate` runs `SEGMENT_TOKENS` tokens at a time and continues from the
      same cache.

    Only greedy: sampling draws every row's token from one random stream, so rows leaving would change every
    later draw; and without stop strings (transformers' stop-string check also reads the prompt's last tokens).
    """
    from posttrain.models.kv_cache import in_place_cache

    device = next(model.parameters()).device
    # the shared prefix, short of every row's last token (each row must feed at least one token of its own)
    shared = 0
    if len(rows) > 1 and _shared_prefix_is_exact(model, max(map(len, rows)) + gen_cfg.max_new_tokens):
        limit = min(len(r) for r in rows) - 1
        while shared < limit and all(r[shared] == rows[0][shared] for r in rows):
            shared += 1
    # each row: the prefix, padding, its own tokens (b, p + the longest own part); the padding is masked out
    width = max(len(r) for r in rows) - shared
    spare = width + gen_cfg.max_new_tokens  # the positions the cache gets after the prefix
    if shared:
        prefix = torch.tensor([rows[0][:shared]], device=device)  # (1, p)
        cache = _prefilled_cache(model, prefix, torch.ones_like(prefix), gen_cfg, repeat=len(rows), spare=spare)
    else:
        cache = in_place_cache(model.config, spare)
    ids = [r[:shared] + [pad_id] * (width - len(r) + shared) + r[shared:] for r in rows]
    mask = [[1] * shared + [0] * (width - len(r) + shared) + [1] * (len(r) - shared) for r in rows]
    return _decode_rows_leave(model, torch.tensor(ids, device=device), torch.tensor(mask, device=device), cache,
                              gen_cfg, eos)  # fmt: skip


def _shared_prefix_is_exact(model, length: int) -> bool:
    """Whether padding between the shared prefix and a row's own tokens computes what left padding does (so the
    prefix may be shared): it is masked out either way, but a sliding attention window counts cache slots,
    padding included, so a window shorter than the sequence (Gemma 2 and 3, Mistral) would see other tokens of a
    row than with left padding; ALiBi (`prefix_sharing.slot_distances`: BLOOM, MPT) measures every distance in
    slots, so the padding would move the row's own tokens away from the prefix."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    return (window is None or length <= window) and slot_distances(config) is None


def _decode_rows_leave(model, ids, mask, cache, gen_cfg, eos: list[int], segment_processors=None):
    """`greedy_decode`'s loop: `generate` a segment at a time from `cache`, then drop the rows that ended.
    ids, mask: (b, L), the cache holding the positions before the ones `generate` has not seen yet.

    `segment_processors(alive)`, when given, returns the logits processors of the next segment for the rows
    `alive` (indices into the batch) and a function that turns the segment's new tokens (b', c) into one float
    per token (the rollout engine's sampling log-probs); the loop then also returns those floats per row."""
    alive = list(range(ids.shape[0]))  # row j of `ids` is row alive[j] of the batch
    new: list[list[int]] = [[] for _ in alive]
    floats: list[list[float]] = [[] for _ in alive]
    left = gen_cfg.max_new_tokens
    while alive and left > 0:
        segment = copy.copy(gen_cfg)
        segment.max_new_tokens = min(SEGMENT_TOKENS, left)
        extra, finish = segment_processors(alive) if segment_processors else ({}, None)
        # `generate` feeds the tokens the cache lacks: after the first call, the last token it picked
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=segment,
                             **{_cache_kwarg(): cache}, **extra)  # fmt: skip
        added = out[:, ids.shape[1] :]  # (b, <= SEGMENT_TOKENS): fewer when every row ended
        values = finish(added).tolist() if finish else None
        left -= added.shape[1]
        keep = []
        for j, row in enumerate(added.tolist()):
            new[alive[j]].extend(row)
            if values is not None:
                floats[alive[j]].extend(values[j])
            if not any(t in eos for t in row):  # a row that ended earlier has already left
                keep.append(j)
        ids, mask = out, torch.cat([mask, mask.new_ones(added.shape)], dim=1)
        if len(keep) < len(alive):
            kept = torch.tensor(keep, dtype=torch.long, device=ids.device)
            cache.batch_select_indices(kept)
            ids, mask, alive = ids[kept], mask[kept], [alive[j] for j in keep]
    return (new, floats) if segment_processors else new


def sample_groups(model, prompts: list[list[int]], n: int, gen_cfg, eos: list[int], pad_id: int,
                  segment_processors) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
    """`n` samples of each prompt (`prompts`: token ids, unpadded), as rows prompt-major (row i: prompt i // n):
    each row's new token ids (padding after its EOS, as `generate` returns them) and one float per token from
    `segment_processors` (see `_decode_rows_leave`, which runs the decoding).

    Two savings over one `generate` call on the left-padded (len(prompts) x n)-row batch, neither of which changes
    what a row computes (its prompt at the same positions after the same left padding, its own tokens, attention
    over the same keys):

    - each prompt is encoded once, not n times: the prompts (all but their last token) fill a KV cache, which is
      then repeated n times, and each row feeds its prompt's last token itself;
    - a row that has generated an EOS token leaves the batch and its KV cache (`SEGMENT_TOKENS` at a time).

    Rows leaving changes which rows share a random draw, so the caller's processors must draw each row's token
    from that row's own random stream (the rollout engine's `RowStreams`) for the samples to be repeatable.
    """
    from posttrain.models.kv_cache import in_place_cache

    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)  # (P, L) left-padded
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    # the cache gets each prompt's last token and every new token but the last after the prefill
    spare = gen_cfg.max_new_tokens
    if L > 1:
        cache = _prefilled_cache(model, ids[:, :-1], mask[:, :-1], gen_cfg, repeat=n, spare=spare)
    else:
        cache = in_place_cache(model.config, spare)
    ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    return _decode_rows_leave(model, ids, mask, cache, gen_cfg, eos, segment_processors)


def _prefilled_cache(model, ids, mask, gen_cfg, *, repeat: int, spare: int):
    """A KV cache of `ids` (b, p) under `mask`, each row then repeated `repeat` times (row i -> rows i x repeat ..
    i x repeat + repeat - 1): filled by one greedy `generate` step, whose picked token is not used. Its layers
    write in place with room for `spare` more positions (`kv_cache.in_place_cache`)."""
    from posttrain.models.kv_cache import in_place_cache

    cache = in_place_cache(model.config, spare)
    once = copy.copy(gen_cfg)
    once.max_new_tokens, once.do_sample = 1, False
    model.generate(input_ids=ids, attention_mask=mask, generation_config=once, **{_cache_kwarg(): cache})
    cache.batch_repeat_interleave(repeat)
    return cache


def _cache_kwarg() -> str:
    """The name `generate` takes a KV cache by: `cache` since transformers renamed `past_key_values` (which it
    still takes, with a warning, until 6.0)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    """The token ids before the first EOS (padding after EOS goes too).

    >>> _until_eos([5, 6, 2, 0, 0], [2])
    [5, 6]
    """
    for k, t in enumerate(ids):
        if t in eos:
            return ids[:k]
    return ids


def _cut(text: str, stop: list[str] | None) -> str:
    """Text up to the earliest stop string.

    >>> _cut("answer: 4\\nQ: next", ["\\nQ:", "###"])
    'answer: 4'
    """
    if not stop:
        return text
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text
