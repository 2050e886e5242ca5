"""Fixed-size ring-buffer KV cache, one batch row per replay stream (gpt-fast style).

Every layer owns K and V buffers of shape ``(B, H, S, Dh)`` where B is the number of
streams and S the window in *tokens* (W examples x tokens per example). Buffers are
allocated once and written by index, so their shapes never change (``torch.compile`` and
CUDA graphs keep working). Next to them, ``pos (B, S)`` holds the stream position (token
index) of what each slot holds, ``-1`` for an empty slot; attention masks and relative
(ALiBi) biases are computed from these positions, so slot order never matters.

Writes of a chunk with token positions ``p .. p+T-1`` go to slots ``p % S``: after a
write the buffer holds exactly the last S tokens of the stream (fewer right after a
reset). Streams must therefore write consecutive positions; a stream that jumps (a replay
cursor moving to another point of the history) must :meth:`reset` first.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V ring buffers for B independent streams.

    Args:
        n_layers: L.
        n_streams: B, one row per stream (row 0 = the newest-data stream).
        n_heads: H.
        window: S, slots per stream (tokens). ``0`` is allowed: nothing is ever cached.
        head_dim: Dh.
        device, dtype: of the buffers.
    """

    def __init__(
        self,
        n_layers: int,
        n_streams: int,
        n_heads: int,
        window: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_layers, self.n_streams, self.window = n_layers, n_streams, window
        # Keys and values in one buffer, so that a chunk is written with one indexed copy.
        self.kv = torch.zeros((2, n_layers, n_streams, n_heads, window, head_dim), device=device, dtype=dtype)
        self.k, self.v = self.kv.unbind(0)  # views, each (L, B, H, S, Dh)
        self.pos = torch.full((n_streams, window), -1, device=device, dtype=torch.long)  # (B, S)
        self.labels = torch.full((n_streams, window), -1, device=device, dtype=torch.long)  # (B, S), -1: none
        self._heads = torch.arange(n_heads, device=device)  # (H,) index helper for writes

    def reset(self, b: int | None = None) -> None:
        """Empty stream ``b`` (all streams when ``None``)."""
        rows = slice(None) if b is None else b
        self.kv[:, :, rows] = 0
        self.pos[rows] = -1
        self.labels[rows] = -1

    def read(self, layer: int, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of ``layer`` for the selected streams, each ``(B', H, S, Dh)``.

        A slice returns views (no copy); an index tensor gathers the rows.
        """
        return self.k[layer][rows], self.v[layer][rows]

    def positions(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Token position of each slot of the selected streams, ``(B', S)``; -1 = empty."""
        return self.pos[rows]

    def write(
        self,
        rows: torch.Tensor,
        tpos: torch.Tensor,
        ks: list[torch.Tensor],
        vs: list[torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> None:
        """Append a chunk of T consecutive tokens to each selected stream, in every layer.

        Args:
            rows: ``(B',)`` long, the streams written.
            tpos: ``(B', T)`` long, token positions of the chunk (consecutive per row).
            ks, vs: per layer ``(B', H, T, Dh)``; stored detached (no gradient into the past).
            labels: ``(B', T)`` long, each token's label (-1: none), or None.
        """
        self.write_stacked(rows, tpos, torch.stack([*ks, *vs]).unflatten(0, (2, self.n_layers)), labels)

    @torch.no_grad()
    def write_stacked(self, rows: torch.Tensor, tpos: torch.Tensor, kv: torch.Tensor,
                      labels: torch.Tensor | None = None) -> None:
        """:meth:`write` with keys and values stacked: ``kv (2, L, B', H, T, Dh)``; ``labels (B', T)``:
        the tokens' labels (kept for the copy read-out; -1 or None: none)."""
        S = self.window
        if S == 0:
            return
        T = tpos.shape[1]
        if labels is None:
            labels = torch.full_like(tpos, -1)
        if T > S:  # only the last S tokens survive in the ring anyway
            tpos, kv, labels = tpos[:, T - S :], kv[..., T - S :, :], labels[:, T - S :]
        slots = tpos % S  # (B', T')
        # Broadcast advanced index (B', H, T') selecting kv[:, :, row, head, slot, :] (adjacent
        # advanced indices keep their place: the target is (2, L, B', H, T', Dh), like kv).
        self.kv[:, :, rows[:, None, None], self._heads[None, :, None], slots[:, None, :]] = kv
        self.pos.index_put_((rows[:, None], slots), tpos)
        self.labels.index_put_((rows[:, None], slots), labels)
