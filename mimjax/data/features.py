"""The image features each augmentation of `mimjax.data.augment` yields, importable without
TensorFlow: config checks and the benchmark read it on machines that have no TensorFlow."""

TWO_VIEW = ('lut_two_view',)  # augmentations that return a second view, `image2`


def outputs(augment_name):
  """('image',) or ('image', 'image2') for the augmentation `augment_name`."""
  return ('image', 'image2') if augment_name in TWO_VIEW else ('image',)
