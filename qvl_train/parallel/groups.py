"""Process groups for expert parallelism (EP).

Layout (the one DeepSpeed AutoEP uses with `use_data_before_expert_parallel: false`, so both EP
paths agree on who holds which experts):
- the global data-parallel (DP) group is the whole world (ZeRO-3 partitions over it);
- EP groups are blocks of `ep_size` CONTIGUOUS ranks: {0..ep-1}, {ep..2ep-1}, ...; EP rank r of a
  group holds experts [r*E/ep, (r+1)*E/ep);
- expert-data-parallel (EDP) groups are STRIDED: {0, ep, 2ep, ...}, {1, ep+1, ...}: the ranks
  that hold the same experts (size world/ep).

`ep_size` must divide both the world size and the number of experts (`validate_ep_size`).

Nodes: torchrun numbers the ranks of a node contiguously (node n holds ranks
[n*G, (n+1)*G) for G processes per node), so an EP group, a block of ep contiguous ranks, stays
inside one node whenever ep divides G (any valid ep <= G on 2 or 8 nodes of 8 GPUs: the
all-to-all never leaves the node). A larger ep spans ep/G whole nodes and its all-to-all crosses
the inter-node network; an ep <= G that does not divide G (ep 6 on 3 x 8 GPUs) leaves some groups
straddling two nodes. `ep_layout_warning` says so at start-up; `node_span` / `ep_layout` let
tests and planning simulate any cluster without processes.

`build_ep_groups` is a collective: every rank must call it, in the same order relative to other
`new_group` calls, after torch.distributed is initialised. Under AutoEP DeepSpeed builds its own
EP/EDP groups inside deepspeed.initialize (same layout); `ep_info_from_deepspeed` reads them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class EPInfo:
    world_size: int
    rank: int
    ep_size: int
    ep_rank: int  # rank inside the EP group == index of this rank's expert block
    edp_size: int
    edp_rank: int
    ep_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's EP group
    edp_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's EDP group
    ep_group: object = None  # torch ProcessGroup (None when torch.distributed is not initialised)
    edp_group: object = None

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the experts this rank holds."""
        n = num_experts // self.ep_size
        return self.ep_rank * n, (self.ep_rank + 1) * n


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, int(os.environ.get("LOCAL_RANK", 0))


def valid_ep_sizes(world_size: int, num_experts: int) -> list[int]:
    g = math.gcd(world_size, num_experts)
    return [d for d in range(1, g + 1) if g % d == 0]


def validate_ep_size(ep_size: int, world_size: int, num_experts: int) -> None:
    """Raise ValueError unless ep_size >= 1 divides both world_size and num_experts."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}.")
    problems = []
    if world_size % ep_size:
        problems.append(f"the world size {world_size}")
    if num_experts % ep_size:
        problems.append(f"the number of experts {num_experts}")
    if problems:
        raise ValueError(
            f"ep_size={ep_size} must divide {' and '.join(problems)}. "
            f"Set parallel.ep_size to one of {valid_ep_sizes(world_size, num_experts)} (the values valid for "
            f"world size {world_size} and {num_experts} experts), or change the number of processes."
        )


def ep_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """EP groups: contiguous blocks of ep_size ranks."""
    return [list(range(s, s + ep_size)) for s in range(0, world_size, ep_size)]


def edp_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """EDP groups: ranks with the same EP rank (stride ep_size)."""
    return [list(range(r, world_size, ep_size)) for r in range(ep_size)]


def node_span(ranks: list[int], gpus_per_node: int) -> list[int]:
    """The nodes (torchrun's node ranks) that hold these global ranks."""
    return sorted({r // gpus_per_node for r in ranks})


@dataclass
class EPLayout:
    """Where the groups of a (nodes x gpus_per_node, ep) run fall: for simulation and warnings."""

    num_nodes: int
    gpus_per_node: int
    ep_size: int
    dp_ranks: list[int]  # ZeRO-3's data-parallel group: the whole world
    ep_groups: list[list[int]]
    edp_groups: list[list[int]]
    ep_nodes: list[list[int]]  # the nodes each EP group spans
    edp_nodes: list[list[int]]

    @property
    def ep_inside_nodes(self) -> bool:
        return all(len(n) == 1 for n in self.ep_nodes)


def ep_layout(*, num_nodes: int, gpus_per_node: int, ep_size: int) -> EPLayout:
    world = num_nodes * gpus_per_node
    ep_groups, edp_groups = ep_group_ranks(world, ep_size), edp_group_ranks(world, ep_size)
    return EPLayout(num_nodes=num_nodes, gpus_per_node=gpus_per_node, ep_size=ep_size, dp_ranks=list(range(world)),
                    ep_groups=ep_groups, edp_groups=edp_groups,
                    ep_nodes=[node_span(g, gpus_per_node) for g in ep_groups],
                    edp_nodes=[node_span(g, gpus_per_node) for g in edp_groups])


def ep_layout_warning(world_size: int, ep_size: int, gpus_per_node: int) -> str | None:
    """None when every EP group sits inside one node (or the whole job is one node)."""
    if world_size <= gpus_per_node or world_size % gpus_per_node:
        return None
    layout = ep_layout(num_nodes=world_size // gpus_per_node, gpus_per_node=gpus_per_node, ep_size=ep_size)
    if layout.ep_inside_nodes:
        return None
    crossing = sum(len(n) > 1 for n in layout.ep_nodes)
    if ep_size > gpus_per_node:
        where = f"each spans {max(len(n) for n in layout.ep_nodes)} nodes"
    else:
        where = f"ep_size={ep_size} does not divide the {gpus_per_node} processes per node"
    fits = [d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0]
    return (f"NOTE: {crossing} of {len(layout.ep_groups)} expert-parallel groups cross a node boundary ({where}): "
            "their all-to-all goes over the inter-node network, which is much slower than inside a node. "
            f"parallel.ep_size in {fits} (that also divides the number of experts) keeps every EP group inside a node.")


def warn_if_ep_crosses_nodes(info: EPInfo) -> None:
    """Rank 0 prints ep_layout_warning for this run (LOCAL_WORLD_SIZE: torchrun's processes per node)."""
    note = ep_layout_warning(info.world_size, info.ep_size, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    if note and info.rank == 0:
        print(note, flush=True)


def ep_info_for(rank: int, world_size: int, ep_size: int) -> EPInfo:
    """The rank bookkeeping without process groups (pure; for planning and tests)."""
    ep_ranks = next(g for g in ep_group_ranks(world_size, ep_size) if rank in g)
    edp_ranks = next(g for g in edp_group_ranks(world_size, ep_size) if rank in g)
    return EPInfo(
        world_size=world_size,
        rank=rank,
        ep_size=ep_size,
        ep_rank=ep_ranks.index(rank),
        edp_size=len(edp_ranks),
        edp_rank=edp_ranks.index(rank),
        ep_ranks=ep_ranks,
        edp_ranks=edp_ranks,
    )


def build_ep_groups(ep_size: int, *, num_experts: int, backend: str | None = None) -> EPInfo:
    """Create the EP and EDP groups (collective over the world) and return this rank's EPInfo.

    Without torch.distributed initialised (single process) ep_size must be 1 and the groups are None.
    """
    rank, world, _ = dist_info()
    validate_ep_size(ep_size, world, num_experts)
    info = ep_info_for(rank, world, ep_size)
    if not (dist.is_available() and dist.is_initialized()):
        return info
    warn_if_ep_crosses_nodes(info)
    for ranks in ep_group_ranks(world, ep_size):  # every rank creates every group, same order
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            info.ep_group = g
    for ranks in edp_group_ranks(world, ep_size):
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            info.edp_group = g
    return info


def ep_info_from_deepspeed(ep_size: int) -> EPInfo:
    """EPInfo over the groups DeepSpeed created for AutoEP (call after deepspeed.initialize)."""
    from deepspeed.utils import groups as ds_groups

    rank, world, _ = dist_info()
    info = ep_info_for(rank, world, ep_size)
    name = f"ep_size_{ep_size}"
    info.ep_group = ds_groups._get_expert_parallel_group(name)
    info.edp_group = ds_groups._get_expert_data_parallel_group(name)
    got = dist.get_process_group_ranks(info.ep_group)
    if sorted(got) != info.ep_ranks:
        raise RuntimeError(f"DeepSpeed's EP group {got} differs from the contiguous layout {info.ep_ranks}.")
    warn_if_ep_crosses_nodes(info)
    return info
