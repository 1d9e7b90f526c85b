"""Adagrad against torch.optim: every option on and off, two groups that differ; dense grads,
and nn.Embedding(sparse=True)-style sparse ones."""
import torch

from cases import Case, some_grads, step_all


def sparse_rows_driver(opts, param_lists, step, gen):
    """nn.Embedding(sparse=True)-style grads for the 2-D params (uncoalesced: one row index repeats; now and then
    empty), dense grads for the rest; now and then a param gets no grad (its step must not advance)."""
    def make(i, p):
        if p.dim() != 2 or p.shape[0] <= 1:
            return torch.randn(p.shape, generator=gen, dtype=torch.float64)
        nnz = 0 if (step + i) % 5 == 4 else 3
        rows = torch.randint(0, p.shape[0], (nnz,), generator=gen)
        rows = torch.cat([rows, rows[:1]])
        vals = torch.randn((len(rows), p.shape[1]), generator=gen, dtype=torch.float64)
        return torch.sparse_coo_tensor(rows[None], vals, p.shape)
    step_all(opts, param_lists, some_grads(param_lists[0], step, make))


CASES = [
    # group2's initial_accumulator_value is ignored by torch (it fills every accumulator from the constructor's)
    Case("Adagrad", lambda: torch.optim.Adagrad,
         configs=[{}, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.1},
                  {"initial_accumulator_value": 0.5, "maximize": True, "eps": 1e-6},
                  {"lr_decay": 0.05, "weight_decay": 0.01, "maximize": True, "initial_accumulator_value": 0.1}],
         group2={"lr": 0.03, "lr_decay": 0.02, "weight_decay": 0.05, "eps": 1e-8, "initial_accumulator_value": 0.3}),
    Case("Adagrad", lambda: torch.optim.Adagrad, driver=sparse_rows_driver, kernel=False, complex_ok=False,
         dense_grads=False,
         configs=[{"lr": 0.1, "lr_decay": 0.01, "maximize": True, "initial_accumulator_value": 0.2}],
         group2={"lr": 0.03, "eps": 1e-6}),
]
