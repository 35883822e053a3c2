"""The mathematics of onnxstain: detectors, trigger search and false-positive bounds.

Nothing in this package knows about ONNX; everything is testable against simulation.
"""
