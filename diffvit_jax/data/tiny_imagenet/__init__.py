"""TFDS builder for Tiny ImageNet (CS231n), written to array_record.

Import `tiny_imagenet_dataset_builder` only to build (it registers the
builder with TFDS); reading goes through `diffvit_jax.data.sources`, which
needs neither this builder nor TensorFlow.
"""
