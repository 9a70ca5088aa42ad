"""pytest plugin (``-p cpu_seed``) for the upstream runs: without CUDA, ``torch.cuda.manual_seed(s)`` seeds the
CPU generator (``torch.manual_seed(s)``). CCE's files seed their draws with ``torch.cuda.manual_seed(0)`` only,
so on CPU they would draw other inputs on every run; with this their CPU draws are seeded as their CUDA ones."""

import torch

if not torch.cuda.is_available():
    torch.cuda.manual_seed = torch.manual_seed
