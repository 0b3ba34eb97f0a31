"""A site's data pipeline: datalists, DICOM/NIfTI readers, the MONAI preprocessing, the case cache and the fingerprint.

Nothing here knows about Flower; training, inference, the ClientApp runtime and the site commands all read cases through it.
"""
