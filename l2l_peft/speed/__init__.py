"""Speed machinery: each module makes one step faster without changing what it computes.

attention (kernel choice, used by the backbone and the training step), precision (frozen weights
stored in bf16), graphs (CUDA-graph capture of the step), prefix (the frozen-prefix cache, a batch
source for train()). Importing the package imports none of them, so the backbone can use
`attention` while `prefix` builds on the backbone.
"""
