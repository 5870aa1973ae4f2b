"""`deer-reid train`: metric-learning fine-tuning of a body network on labelled photos.

data.py splits identities (never measure on what it learned) and builds the classes; arcface.py is
the loss; train.py the loop, checkpoints and the model card; labels.py exports a property's own
confirmed identifications as a folder `train` accepts.
"""
