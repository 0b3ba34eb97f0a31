"""Whole-volume inference with a trained model: sliding window, test-time flips, resampling back onto the scan,
the predictor behind ``client predict``, the files a network is loaded from (model files, export folders, a
site's own local-norm weights), ONNX/int8 engines and DICOM SEG output.

Training's evaluation and the site commands call it; it calls only the data pipeline.
"""
