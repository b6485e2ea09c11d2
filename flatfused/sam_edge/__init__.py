"""The experiments of Long & Bartlett, "Sharpness-Aware Minimization and the Edge of Stability"
(2023), in PyTorch: ``flatfused sam-edge image-classification`` and ``flatfused sam-edge
transformer`` train with gradient descent or SAM and log the Hessian's operator norm against
the SAM edge and ``2/η`` (docs/sam_edge.md).

Modules: ``data`` (images from local MNIST/CIFAR-10 files or generated digits; text for the
transformer), ``models`` (the MLP, CNN and transformer language model), ``tasks`` (each
experiment's data, model, loss and test measurement), ``experiment`` (the training loop with
its checks and the raw data), ``plots`` (the four figures), ``record`` (the JSON record of a
run) and ``cli`` (the command). The measurements are :class:`flatfused.sharpness.SAMEdgeTracker`'s
and the SAM step is :class:`flatfused.SAM`'s.
"""
