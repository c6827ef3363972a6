"""Point-to-point collectives for parallel inference; they work on every backend, ring included.

mlx-lm combines tensor and pipeline parallelism with subgroups from `Group.split`, which the
ring backend does not implement ("[ring] Group split not supported"). Here stages are runs
of T consecutive ranks, and both the tensor-parallel sums inside a stage (`ChainGroup`) and
the hand-over between stages (`Stages`) are sends between neighbouring ranks, which every
backend supports (the ring one only between neighbours).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from ..weights.sharding import ShardingError


def all_sum(x: mx.array, group) -> mx.array:
    """Sum over a tensor-parallel group: an mx.distributed Group, or a ChainGroup."""
    if isinstance(group, ChainGroup):
        return group.all_sum(x)
    return mx.distributed.all_sum(x, group=group)


def _enqueue(x: mx.array) -> mx.array:
    """Put a send/recv on its stream now, in program order.

    Sends and receives have no data dependency that orders them against the other
    transfers of the same rank; scheduling each at creation keeps every rank's transfers
    in the order the protocol below was written for, which is deadlock free.
    """
    mx.async_eval(x)
    return x


class ChainGroup:
    """A run of consecutive ranks of `group` that acts as a tensor-parallel group without
    `Group.split`: its all_sum is built from sends between neighbours.

    all_sum: partial sums travel left to right ((x0 + x1) + x2) + ..., and the last rank's
    total travels back, so every member gets bitwise the same sum. All transfers are
    between neighbouring ranks.
    """

    def __init__(self, group, members: Sequence[int]):
        self.group = group
        self.members = list(members)
        if group.rank() not in self.members:
            raise ValueError(f"rank {group.rank()} is not in {self.members}")
        if self.members != list(range(self.members[0], self.members[0] + len(self.members))):
            raise ValueError(f"members must be consecutive ranks, got {self.members}")
        self.index = self.members.index(group.rank())

    def rank(self) -> int:
        return self.index

    def size(self) -> int:
        return len(self.members)

    def all_sum(self, x: mx.array) -> mx.array:
        n, i, g, ms = len(self.members), self.index, self.group, self.members
        if n == 1:
            return x
        if i > 0:
            x = _enqueue(mx.distributed.recv_like(x, ms[i - 1], group=g)) + x
        if i < n - 1:
            _enqueue(mx.distributed.send(x, ms[i + 1], group=g))
            total = _enqueue(mx.distributed.recv_like(x, ms[i + 1], group=g))
        else:
            total = x
        if i > 0:
            sent = _enqueue(mx.distributed.send(total, ms[i - 1], group=g))
            total = mx.depends(total, sent)
        return total


class Stages:
    """Pipeline stages of `tensor` consecutive ranks each over `group` (tensor=1: one rank each).

    Stage s is ranks [s*T, (s+1)*T); stage P-1 runs the first layers, stage 0 the last
    (as mlx-lm, so that rank 0 holds the output). Between stages the hidden state goes
    from the first rank of stage s+1 to the last rank of stage s (neighbours), and on
    down that stage rank by rank.
    """

    def __init__(self, group, tensor: int = 1):
        n = group.size()
        if tensor < 1 or n % tensor:
            raise ShardingError(f"{n} ranks do not split into stages of {tensor} tensor-parallel ranks")
        self.group = group
        self.tensor = tensor
        self.global_rank = group.rank()
        self.stage = self.global_rank // tensor

    def rank(self) -> int:
        return self.stage

    def size(self) -> int:
        return self.group.size() // self.tensor

    @property
    def first(self) -> bool:  # runs layer 0
        return self.stage == self.size() - 1

    @property
    def last(self) -> bool:  # runs the final layer; holds rank 0
        return self.stage == 0

    def tensor_group(self):
        """The tensor-parallel group of this rank's stage (None when stages are single ranks)."""
        if self.tensor == 1:
            return None
        if self.size() == 1:
            return self.group
        s = self.stage * self.tensor
        return ChainGroup(self.group, range(s, s + self.tensor))

    def receive(self, shape, dtype) -> mx.array:
        r, g = self.global_rank, self.group
        h = _enqueue(mx.distributed.recv(shape, dtype, r + 1, group=g))
        if r % self.tensor:  # pass it on down this stage
            sent = _enqueue(mx.distributed.send(h, r - 1, group=g))
            h = mx.depends(h, sent)
        return h

    def send(self, h: mx.array) -> mx.array:
        r = self.global_rank
        if self.stage > 0 and r % self.tensor == 0:
            sent = _enqueue(mx.distributed.send(h, r - 1, group=self.group))
            h = mx.depends(h, sent)
        return h

    def gather_output(self, h: mx.array) -> mx.array:
        """Every rank gets rank 0's (the last stage's) hidden state."""
        return mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]


def make_groups(group=None, tensor: int = 1):
    """(tensor group, pipeline Stages) for `tensor` x (N / tensor) parallelism over `group`.

    tensor == N: the group itself for tensor parallelism, no pipeline. tensor == 1: a
    pipeline of N single-rank stages. Otherwise stages of `tensor` consecutive ranks.
    """
    group = group or mx.distributed.init()
    n = group.size()
    if tensor < 1 or n % tensor:
        raise ShardingError(f"{n} ranks do not split into tensor-parallel groups of {tensor}")
    if tensor == n:
        return (group if n > 1 else None), None
    stages = Stages(group, tensor)
    return stages.tensor_group(), stages
