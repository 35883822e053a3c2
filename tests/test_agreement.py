"""Top-1 agreement read per image, and per step for a sequence head's ``T × K`` scores."""

import numpy as np

from onnxstain.math.agreement import same_top1, top1, top1_agreement


def test_plain_classifier_rows_are_one_step():
    a = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    b = np.array([[0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
    assert top1(a).tolist() == [[1], [0]]
    assert top1_agreement(a, b).tolist() == [1.0, 0.0]
    assert same_top1(a, b, 3).tolist() == [True, False]


def test_sequence_scores_are_read_step_by_step():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 7))  # 2 images, 5 steps, 7 classes
    pred = ref.copy()
    pred[0, 2] = -pred[0, 2]  # step 2 of image 0 now has another top class
    flat_p, flat_r = pred.reshape(2, -1), ref.reshape(2, -1)
    assert top1(flat_p, 7).shape == (2, 5)
    assert top1_agreement(flat_p, flat_r, 7).tolist() == [0.8, 1.0]
    assert same_top1(flat_p, flat_r, 7).tolist() == [False, True]
    # the flattened argmax would see one (step, class) pair only
    assert top1_agreement(flat_p, flat_r).tolist() in ([1.0, 1.0], [0.0, 1.0])


def test_classes_that_do_not_divide_the_row_read_one_step():
    a = np.arange(10.0).reshape(2, 5)
    assert top1(a, 3).tolist() == [[4], [4]]
