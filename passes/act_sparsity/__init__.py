"""The activation-sparsity family: inputs of matmuls zeroed below a calibrated threshold.

| pass | file | score, site |
|---|---|---|
| ``teal`` | ``activation.py`` | ``|x|`` at the inputs of every linear in the blocks (q/k/v, o, gate/up, down) |
| ``wina`` | ``activation.py`` | ``|x_i| * ||W[:, i]||_2`` (column norms of the weights that read ``x``), same sites |
| ``cats`` | ``activation.py`` | ``|act(gate(x))|`` at the MLP's gate activation output (MLP only) |
| ``rsparse`` | ``activation.py`` | TEAL's sites and score, plus ``lowbit::lowrank_residual``: a rank-``rank`` SVD of each reading weight over the zeroed inputs |
| ``fuse_sparse_input`` | ``activation.py`` | ``act_sparsify`` + ``wo_linear`` / ``qa_linear`` -> ``lowbit::sparse_input_linear`` / ``sparse_input_qa_linear`` |

Thresholds come from the calibration engine (the ``samples`` of each site), per site, to a
target sparsity (option ``sparsity``, default 0.5); the achieved sparsity per site is in the
summary. The weight-sparsity family (N:M, Wanda, SparseGPT) lives elsewhere.
"""
from lowbit_compiler.passes.act_sparsity import activation  # noqa: F401
