"""Constants of the data formats every stage shares: the image placeholder and the label value the loss ignores.

One module at the package root, so that data generation (raider), evaluation and training can write and
read LLaVA-format records without importing the chat model.
"""

IGNORE_INDEX = -100  # label value the loss ignores (prompt, system, image positions)
IMAGE_TOKEN = "<image>"  # the placeholder in conversation text
IMAGE_TOKEN_INDEX = -200  # its id in input_ids: never a real token
MAX_CASE_SLIDES = 8  # a case: the slides of one patient's specimen asked about together
