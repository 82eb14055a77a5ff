"""The KV cache: what generation keeps so each new token costs one position, not the whole sequence.

A layer whose mask rule has a finite span (a sliding window: model.mask = "window") never reads keys older
than the span, so KVCache keeps only the last ones, in a ring (`Ring`): a ring of R columns stores cache
column c in slot c % R, and remembers which column each slot holds, so a pass rebuilds its mask from the
positions and padding of the columns actually there. Other layers keep every column.
"""

from __future__ import annotations

import torch

from gptlab.model.masks import MaskRule, rule_mask


class KVCache:
    """Keys and values of every position seen so far, preallocated: [B, K, max_len, C] per layer, or
    [B, K, span + slack, C] for a layer with a sliding window (a `Ring`).

    `valid` marks real tokens (False at left padding), so prompts of different lengths share a batch:
    each row's positions count only its real tokens, and no query ever attends to padding.

    Two ways in, both reading the columns filled so far. GPT.forward(cache=cache) appends any number of
    tokens a row (a prompt). GPT.forward(cache=cache.step()) appends one token a row through `StepRows`,
    whose state is tensors, not Python ints, and whose only changing shape is the number of columns read,
    marked dynamic: a torch.compile'd decode step is traced once for every position, not once a position.
    (A ring is read whole, at the same width every step.)

    `slack`: how many tokens a rewind (setting `length` back) may take back. Only rings care: they hold
    span + slack columns, so that the window before the point rewound to is still there. HellaSwag scoring
    rewinds each ending back to the context and passes its longest ending; plain generation never rewinds.
    The per-column bookkeeping (`valid`, `key_positions`) stays max_len long: a few bytes a row and column,
    against 2 x heads x head size numbers a layer for the keys and values.
    """

    def __init__(self, batch_size: int, max_len: int, device=None, slack: int = 0):
        self.batch_size, self.max_len, self.slack = batch_size, max_len, slack
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rings: dict[int, Ring] = {}  # the layers whose rule has a span shorter than the cache
        self.start = self._length = 0  # the positions being written are [start, length)
        # the same state as tensors, for StepRows: the last column written, each row's real tokens so far
        self.column = torch.full((1,), -1, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.key_positions = torch.zeros(batch_size, max_len + 1, dtype=torch.long, device=device)  # per column
        self._step = StepRows(self)

    def append(self, valid: torch.Tensor):
        """Make room for T new tokens ([B, T] bool, True = real); return their positions [B, T]. The causal
        mask of the pass, [B, 1, T, T_keys], is kept for update()."""
        T = valid.size(1)
        self._advance(T)
        self.valid[:, self.start : self.length] = valid
        seen = self.valid[:, : self.start].sum(dim=1, keepdim=True)
        positions = (seen + valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        self.seen.copy_(seen + valid.sum(dim=1, keepdim=True))
        self.column.fill_(self.length - 1)
        query = torch.arange(self.start, self.length, device=valid.device)[:, None]
        key = torch.arange(self.length, device=valid.device)[None, :]
        # causal, no padding keys; a padding query sees itself so its softmax has no empty row (no NaN)
        mask = (key <= query) & (self.valid[:, None, : self.length] | (key == query))  # [B, T, T_keys]
        self.key_positions[:, self.start : self.length] = positions
        self.positions, self.mask = positions, mask.unsqueeze(1)
        return positions

    def update(self, layer, k: torch.Tensor, v: torch.Tensor, rule: MaskRule):
        """Write a layer's new keys and values; return every one so far (or its ring's and the new ones) and the
        mask of this pass under `rule`."""
        ring = self.ring(layer, k, rule)
        if ring is not None:
            return ring.prefill(self, k, v, rule)
        keys, values = self.layer(layer, k, v)
        keys[:, :, self.start : self.length] = k
        values[:, :, self.start : self.length] = v
        mask = self.mask if rule.causal else self.mask & rule_mask(rule, self.positions, self.key_positions[:, : self.length])[:, None]
        return keys[:, :, : self.length], values[:, :, : self.length], mask

    def layer(self, layer, k: torch.Tensor, v: torch.Tensor):
        """A layer's key and value tensors, allocated at first use with the dtype and device of the model's keys."""
        if layer not in self.keys:
            # one column more than ever filled: the filled columns are then never the whole tensor, so their
            # slice has the same kind of strides at every length (a compiled step is not retraced at a full cache)
            shape = (self.batch_size, k.size(1), self.max_len + 1, k.size(3))
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def ring(self, layer, k: torch.Tensor, rule: MaskRule) -> Ring | None:
        """The layer's ring, made at first use, where its rule sees only the last `span` keys and a ring of
        span + slack columns is smaller than the cache; else None (every column is kept)."""
        if layer not in self.rings:
            if rule.span is None or rule.span + self.slack >= self.max_len:
                return None
            self.rings[layer] = Ring(rule.span, rule.span + self.slack, self.batch_size, k)
        return self.rings[layer]

    def step(self) -> StepRows:
        """The cache continued by one real token a row (a decode step): pass it to GPT.forward as `cache`."""
        self._advance(1)
        self.valid[:, self.start] = True
        # the columns attention reads: those filled so far, made here, outside a compiled step; its width is a
        # tensor size torch.compile keeps symbolic (one graph for every length). A copy, not a view of `valid`:
        # a view's strides change kind when it spans every column, which a compiled step would be retraced for
        self._step.mask = self.valid[:, None, None, : self.length].contiguous()
        torch._dynamo.maybe_mark_dynamic(self._step.mask, 3)
        return self._step

    @property
    def length(self) -> int:
        """Positions filled. Setting it back rewinds the cache: what came after is forgotten (HellaSwag's
        endings each continue the same context). A ring must still hold the window before the point rewound
        to; if tokens written since have overwritten part of it, rewinding raises ValueError."""
        return self._length

    @length.setter
    def length(self, length: int) -> None:
        for ring in self.rings.values():
            if not ring.holds_window_before(length):
                raise ValueError(
                    f"cannot rewind the KV cache from {self._length} to {length} positions: a window layer's ring "
                    f"({ring.capacity} columns) has overwritten keys of its window before {length}; "
                    f"make the KVCache with slack >= the tokens a rewind takes back"
                )
        self._length = length
        self.valid[:, length:] = False
        self.seen.copy_(self.valid.sum(dim=1, keepdim=True))
        self.column.fill_(length - 1)

    def _advance(self, T: int) -> None:
        if self._length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self._length} used, {T} more asked")
        self.start, self._length = self._length, self._length + T


class StepRows:
    """One real token a row written at its KVCache's next column (KVCache.step() keeps the Python count and
    marks the column real). Reads and writes only tensors (column, seen, the keys, the mask), so the same
    compiled step serves every position."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.mask = cache.valid[:, None, None, :]  # set by KVCache.step()

    def append(self, valid: torch.Tensor):
        cache = self.cache
        cache.column += 1
        self.positions = cache.seen.clone()  # [B, 1]: each row's real tokens before this one
        cache.key_positions.index_copy_(1, cache.column, self.positions)
        cache.seen += 1
        return self.positions

    def update(self, layer, k: torch.Tensor, v: torch.Tensor, rule: MaskRule):
        ring = self.cache.ring(layer, k, rule)
        if ring is not None:
            return ring.step(self, k, v, rule)
        keys, values = self.cache.layer(layer, k, v)
        keys.index_copy_(2, self.cache.column, k)
        values.index_copy_(2, self.cache.column, v)
        width = self.mask.size(-1)
        mask = self.mask  # [B, 1, 1, width]
        if not rule.causal:
            mask = mask & rule_mask(rule, self.positions, self.cache.key_positions[:, :width])[:, None]
        return keys[:, :, :width], values[:, :, :width], mask


class Ring:
    """One window layer's keys and values in a KVCache: the last `capacity` columns written, column c in slot
    c % capacity, [B, K, capacity, C], and `columns` [capacity], the cache column each slot holds (-1: none).

    A query at column c sees at most the `span` columns c - span + 1 .. c. Rows are left-padded (padding only
    before a row's first real token), so those columns are the row's last `span` real tokens, or fewer and
    some padding, which the cache's `valid` hides. capacity = span holds them; capacity = span + slack also
    keeps them after a rewind of up to `slack` tokens, whose writes overwrote only slots older than that.

    A pass reads the ring whole and masks it from what each slot holds: its column must be filled (>= 0),
    not later than the query's (after a rewind a slot may hold a forgotten later column), real (`valid`),
    and allowed by the rule at the positions the cache recorded for it. Slots are not in column order, which
    attention does not mind: it sums over keys, whatever their order.
    """

    def __init__(self, span: int, capacity: int, batch_size: int, k: torch.Tensor):
        self.span, self.capacity = span, capacity
        shape = (batch_size, k.size(1), capacity, k.size(3))
        self.keys, self.values = k.new_zeros(shape), k.new_zeros(shape)
        self.columns = torch.full((capacity,), -1, dtype=torch.long, device=k.device)

    def held(self, cache: KVCache, last) -> tuple[torch.Tensor, torch.Tensor]:
        """Which slots hold a real token at column `last` (an int or a [1] tensor) or before, for each row
        ([B, capacity] bool), and those tokens' positions ([B, capacity])."""
        at = self.columns.clamp(min=0)
        held = (self.columns >= 0) & (self.columns <= last) & cache.valid[:, at]
        return held, cache.key_positions[:, at]

    def prefill(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, rule: MaskRule):
        """T new keys a row at columns [cache.start, cache.length): the queries attend over the ring as it was
        (every slot is older than them) and the new keys, [B, K, capacity + T, C]; then the ring keeps the
        last `capacity` new columns."""
        start, end = cache.start, cache.length
        T = end - start
        old, old_positions = self.held(cache, start - 1)  # [B, capacity]
        seen = torch.cat([old[:, None, None, :].expand(-1, 1, T, -1), cache.mask[..., start:end]], dim=-1)
        key_positions = torch.cat([old_positions, cache.positions], dim=1)  # [B, capacity + T]
        mask = seen & rule_mask(rule, cache.positions, key_positions)[:, None]
        keys, values = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        kept = min(T, self.capacity)
        columns = torch.arange(end - kept, end, device=k.device)
        slots = columns % self.capacity
        self.keys[:, :, slots] = k[:, :, T - kept :]
        self.values[:, :, slots] = v[:, :, T - kept :]
        self.columns[slots] = columns
        return keys, values, mask

    def step(self, rows: StepRows, k: torch.Tensor, v: torch.Tensor, rule: MaskRule):
        """One new key a row at the cache's `column` (a tensor: compiled steps see no Python count): written
        to its slot first, then the ring is read whole, at the same width every step."""
        column = rows.cache.column
        slot = column % self.capacity
        self.keys.index_copy_(2, slot, k)
        self.values.index_copy_(2, slot, v)
        self.columns.index_copy_(0, slot, column)
        held, positions = self.held(rows.cache, column)
        mask = held[:, None, None, :] & rule_mask(rule, rows.positions, positions)[:, None]  # [B, 1, 1, capacity]
        return self.keys, self.values, mask

    def holds_window_before(self, length: int) -> bool:
        """Whether the ring still holds the columns a query at column `length` may see before itself."""
        needed = torch.arange(max(0, length - self.span + 1), length, device=self.columns.device)
        return bool((self.columns[needed % self.capacity] == needed).all())


class SlotCache:
    """Keys and values of `slots` independent sequences, for serving: [S, K, max_len, C] per layer, a length per slot.

    Unlike KVCache, whose rows advance together, each slot has its own length: a request takes a free slot,
    runs its prompt through it (with others that arrived with it), then joins the others' decode steps, one token a step, and leaves
    when it is done, without waiting for the rest. `rows(slots)` is the view the model's forward takes as
    its cache. A slot keeps what it held after its request left (`tokens`), so the next request whose
    prompt starts the same way only runs the rest of it (the prompt cache).
    """

    def __init__(self, slots: int, max_len: int, device=None):
        self.slots, self.max_len, self.device = slots, max_len, device
        self.lengths = [0] * slots  # positions filled in each slot
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # the token at each filled position
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def rows(self, slots: list[int]) -> SlotRows:
        return SlotRows(self, slots)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` positions of a slot (a prompt sharing them continues from there)."""
        self.lengths[slot] = length
        del self.tokens[slot][length:]

    def shared_prefix(self, slot: int, ids: list[int]) -> int:
        """How many leading tokens of `ids` the slot holds already."""
        n = 0
        for held, wanted in zip(self.tokens[slot], ids):
            if held != wanted:
                break
            n += 1
        return n


class SlotRows:
    """Some slots of a SlotCache, each continued by up to T tokens in one forward pass: what GPT.forward calls
    `cache`. Rows with fewer tokens are left-padded (`valid` False): row i's real tokens sit at positions
    lengths[slot_i], lengths[slot_i] + 1, ... of its own slot; its padding is written to a spare column past
    max_len that nothing reads, and its last column is its last real token, whose logits the forward returns."""

    def __init__(self, cache: SlotCache, slots: list[int]):
        self.cache, self.slots = cache, slots
        self.index = torch.tensor(slots, dtype=torch.long, device=cache.device)

    def append(self, valid: torch.Tensor):
        """Make room for the real tokens of each row ([B, T] bool, padding first); return positions and mask."""
        T, device = valid.size(1), valid.device
        counts = valid.sum(dim=1).tolist()
        starts = [self.cache.lengths[s] for s in self.slots]
        ends = [start + n for start, n in zip(starts, counts)]
        if max(ends) > self.cache.max_len:
            raise ValueError(f"a slot holds {self.cache.max_len} positions; {max(ends)} asked")
        for s, end in zip(self.slots, ends):
            self.cache.lengths[s] = end
        self.width = max(ends)  # keys read this pass: the longest row's
        padding = T - torch.tensor(counts, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device) - padding[:, None]
        self.write_at = positions.masked_fill(~valid, self.cache.max_len)  # padding goes to the spare column
        keys = torch.arange(self.width, device=device)
        # a row sees its own positions up to the query (later ones hold another request's leftovers or nothing);
        # a padding query sees key 0 only, so that its softmax has a row to normalise (its output is never used)
        mask = torch.where(valid[:, :, None], keys <= positions[:, :, None], keys == 0)  # [B, T, width]
        self.mask, self.positions = mask.unsqueeze(1), positions.clamp(min=0)
        return self.positions

    def update(self, layer, k: torch.Tensor, v: torch.Tensor, rule: MaskRule):
        cache = self.cache
        if layer not in cache.keys:  # + 1: the spare column padding is written to
            shape = (cache.slots, k.size(1), cache.max_len + 1, k.size(3))
            cache.keys[layer], cache.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
        keys, values = cache.keys[layer], cache.values[layer]
        where = (self.index[:, None], slice(None), self.write_at)  # -> [B, T, K, C]
        keys[where] = k.transpose(1, 2)
        values[where] = v.transpose(1, 2)
        mask = self.mask  # a slot's columns are its positions
        if not rule.causal:
            columns = torch.arange(self.width, device=k.device)
            mask = mask & rule_mask(rule, self.positions, columns[None])[:, None]
        return keys[self.index, :, : self.width], values[self.index, :, : self.width], mask
