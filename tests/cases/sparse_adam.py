"""SparseAdam against torch.optim: sparse COO grads, made by the driver."""
import torch

from cases import Case, some_grads, step_all

# SparseAdam: embedding-like tables. A param's grad indexes its leading dims (all of them for 1-D: fully sparse;
# the first two for 3-D: hybrid) with repeated rows, so the optimizer must coalesce.
SPARSE_SHAPES = [(13, 4), (9,), (6, 2, 3), (1, 5), (0, 3)]
SPARSE_SHAPES_2 = [(8, 3), (5,)]


def _sparse_dim(p):
    return 1 if p.dim() <= 2 else p.dim() - 1


def sparse_driver(opts, param_lists, step, gen):
    """Same uncoalesced sparse grads for every optimizer. Now and then a param gets no grad (its step must not
    advance) or an empty one (its step advances, nothing else changes)."""
    def make(i, p):
        k = _sparse_dim(p)
        nnz = 0 if (step + i) % 5 == 4 or p.numel() == 0 else p.shape[0] + 1
        idx = torch.stack([torch.randint(0, max(s, 1), (nnz,), generator=gen) for s in p.shape[:k]])
        vals = torch.randn((nnz, *p.shape[k:]), generator=gen, dtype=torch.float64)
        return torch.sparse_coo_tensor(idx, vals, p.shape, check_invariants=False)  # uncoalesced
    step_all(opts, param_lists, some_grads(param_lists[0], step, make))


CASES = [
    Case("SparseAdam", lambda: torch.optim.SparseAdam,
         configs=[{}, {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True}, {"lr": 0.05, "eps": 1e-6}],
         group2={"lr": 3e-3}, shapes=SPARSE_SHAPES, shapes2=SPARSE_SHAPES_2, driver=sparse_driver,
         complex_ok=False, dense_grads=False),
]
