"""The batch store of continuous batching: rows of several KVStores put side by side, and taken out again.

A KVStore holds [rows, kv_heads, positions, head_dim] per layer and one shared length; decode_step
feeds every row one token per step. In the batch store each row's real tokens are the last
`next_position[row]` positions (left padding before them, marked invalid), so rows of different
lengths step together: a row's RoPE positions count its own tokens, and the attention mask hides the
padding. `assemble` builds a new batch store from rows of other stores (a prefill's store, the
previous batch store) whenever rows join or leave, trimmed to the longest row; `copy_row_back` puts
a finished row into a batch-1 store (what a later turn can continue from); `pick_tokens` picks every
row's next token with that row's own sampling settings.

Padding positions hold zeros or the keys of a padding token, never uninitialised memory: a masked
position gets weight 0 in attention, and 0 x NaN would still be NaN.
"""
from __future__ import annotations

from typing import Sequence

import torch

from glmsetup.runtime import sampling

PAD_ID = 0  # what a padded prompt position is fed (it is masked out)
_EMPTY = torch.zeros(1, 0, dtype=torch.long)


def row_length(store, row: int) -> int:
    """The real tokens of a row (its valid positions, the last ones of the store)."""
    return int(store.next_position[row])


def assemble(model, parts: Sequence[tuple], slack: int):
    """A new store with the given rows, in order: parts is [(store, [row, ...]), ...].

    Rows stay right-aligned: the new store is as long as the longest row, and holds `slack` more
    positions before it has to grow.
    """
    width = max(row_length(store, r) for store, rows in parts for r in rows)
    total = sum(len(rows) for _store, rows in parts)
    new = model.new_store(total, width + max(slack, 1))
    dst = 0
    for store, rows in parts:
        n = len(rows)
        cols = min(width, store.length)  # the last `cols` positions of the source hold every row it gives
        a, b = store.length - cols, store.length
        lo = width - cols
        idx = torch.tensor(rows, dtype=torch.long)
        contiguous = rows == list(range(rows[0], rows[0] + n))
        for i in range(len(new.keys)):
            for src, out in ((store.keys[i], new.keys[i]), (store.values[i], new.values[i])):
                part = src[rows[0]:rows[0] + n, :, a:b] if contiguous else src[:, :, a:b].index_select(
                    0, idx.to(src.device))
                out[dst:dst + n, :, lo:width] = part
                if lo:
                    out[dst:dst + n, :, :lo].zero_()
        valid = store.valid[:, a:b][idx.to(store.valid.device)]
        new.valid[dst:dst + n, lo:width] = valid.to(new.valid.device)
        for j, r in enumerate(rows):
            new.next_position[dst + j] = store.next_position[r]
        dst += n
    new.length = width
    return new


def copy_row_back(src, row: int, home, tokens: list) -> None:
    """Put row `row` of the batch store `src` into the batch-1 store `home`, as if it had been
    generated there: positions 0..L-1, `tokens` (the row's L real token ids) as its token list."""
    n = row_length(src, row)
    if len(tokens) != n:
        raise RuntimeError(f"a batch row holds {n} positions but {len(tokens)} token ids")
    a, b = src.length - n, src.length
    home.length = 0  # nothing of the old content is kept: reserve need not copy it
    home.reserve(n)
    for i in range(len(home.keys)):
        home.keys[i][0, :, :n] = src.keys[i][row, :, a:b]
        home.values[i][0, :, :n] = src.values[i][row, :, a:b]
    home.valid[0, :n] = True
    home.length = n
    home.tokens[0] = list(tokens)
    home.next_position[0] = n


def left_padded(id_lists: Sequence[list]) -> tuple:
    """(input_ids, attention_mask or None) for prompts of different lengths, padded on the left."""
    width = max(len(ids) for ids in id_lists)
    if all(len(ids) == width for ids in id_lists):
        return torch.tensor([list(ids) for ids in id_lists]), None
    ids = [[PAD_ID] * (width - len(x)) + list(x) for x in id_lists]
    mask = [[0] * (width - len(x)) + [1] * len(x) for x in id_lists]
    return torch.tensor(ids), torch.tensor(mask)


def packed_groups(requests: Sequence, length, max_positions: int) -> list[list]:
    """Requests in groups for one ChatGLM2ForCausalLM.prefill_packed call each, without padding. A group's
    cache is still rows x its longest prompt, so that product stays within `max_positions`, as a
    left-padded group's does (a longer prompt goes alone): sorted by length, one prompt of 2000 tokens
    does not make 15 short ones take 2000 positions each."""
    groups: list[list] = []
    for req in sorted(requests, key=length):  # the last request added is a group's longest
        if groups and (len(groups[-1]) + 1) * length(req) <= max_positions:
            groups[-1].append(req)
        else:
            groups.append([req])
    return groups


def prefill_groups(requests: Sequence, length, max_positions: int, costs: tuple = (0, 0)) -> list[list]:
    """Requests in groups to prefill together, left padded to each group's longest prompt. Padding is
    work too (15 prompts of 13-25 tokens padded to 25 make 375 positions for 241 real ones), so the
    requests, sorted by length, are cut where the total cost is least: a group costs its padded
    positions, rounded up to 8 (the CPU kernels' vector of rows), plus costs = (per call, per 32
    positions) more: a call's fixed cost, and another pass over the weights (on a CPU: little of
    either; on a GPU a call's launches outweigh a few padded positions). A group holds at most
    `max_positions` padded positions (a longer prompt goes alone)."""
    per_call, per_pass = costs
    reqs = sorted(requests, key=length)
    sizes = [length(r) for r in reqs]
    best = [0.0] + [float("inf")] * len(reqs)  # best[j]: the least cost of the first j requests
    cut = [0] * (len(reqs) + 1)
    for j in range(1, len(reqs) + 1):
        for i in range(j - 1, -1, -1):  # the last group: reqs[i:j], padded to sizes[j - 1]
            rows = (j - i) * sizes[j - 1]
            if rows > max_positions and j - i > 1:
                break
            cost = best[i] + -(-rows // 8) * 8 + per_pass * -(-rows // 32) + per_call
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list] = []
    j = len(reqs)
    while j:
        groups.append(reqs[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def guard_rows(scores: torch.Tensor) -> torch.Tensor:
    """sampling.guard_invalid row by row: a row with NaN or +inf (or nothing left to pick) becomes all
    zeros with token 5 at 5e4; the other rows of the batch are left alone."""
    bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
    if not bool(bad.any()):
        return scores
    scores = scores.clone()
    scores[bad] = 0.0
    scores[bad, 5] = 5e4
    return scores


def pick_tokens(logits: torch.Tensor, rows: Sequence) -> list:
    """Each row's next token from [rows, vocab] fp32 logits, by sampling.next_tokens with the row's own
    settings (`row.s`, `row.generated`, `row.context`); None where that failed (`row.error` says why).
    Rows with the same plain settings (no penalty, processors or min_new_tokens pending) go in one call."""
    out: list = [None] * len(rows)
    plain: dict = {}
    for i, row in enumerate(rows):
        s = row.s
        if s.needs_context or row.generated < s.min_new_tokens:
            try:  # the repetition penalty and the processors see the row's own context
                out[i] = int(sampling.next_tokens(logits[i:i + 1], torch.tensor([row.context]), s, row.generated)[0])
            except Exception as exc:  # e.g. a caller's logits processor: only its row fails
                row.error = exc
        else:
            plain.setdefault((True,) if s.greedy else (s.temperature, s.top_k, s.top_p), []).append(i)
    for idx in plain.values():
        s = rows[idx[0]].s
        scores = guard_rows(logits if len(idx) == len(rows) else logits[idx])
        for i, token in zip(idx, sampling.next_tokens(scores, _EMPTY, s, s.min_new_tokens).tolist()):
            out[i] = int(token)
    return out
