"""Our custom kernels (Triton, CUDA only), each module beside the plain torch code it must agree with.

A layer chooses between a kernel and its reference when it is built (`minisgl.layers.LayerOptions`);
nothing here decides by itself. On a machine without Triton or without a GPU only the references run.
"""
