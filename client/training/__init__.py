"""Local training at a site: the training and evaluation loops, losses, DP-SGD with Opacus (fedseg's grad samplers,
ghost clipping and optimizer) and the site's privacy ledger.

No Flower here: the ClientApp runtime and ``client finetune`` call it.
"""
