"""Stage 1 of the spine pipeline: pretrain a ResNet encoder on many 2D images (supervised from class
folders, or self-supervised from unlabeled slices) and hand it to ``spineauto train --pretrained``.

``shards``: image folders and raw datasets -> memory-mapped shards (parallel, resumable);
``train``: the pretraining loop (SimCLR via lightly, or supervised), its checkpoint and loader timing;
``run``: the ``spineauto pretrain`` command's steps.
"""
