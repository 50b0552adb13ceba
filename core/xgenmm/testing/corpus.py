"""A small embedded English corpus for training the random checkpoints' BPE tokenizer.

Original text written for this project (no third-party content). It only has to give the tokenizer realistic
English sub-word pieces, so that encoded prompts are a few tokens per word instead of one byte per character. It is
plain printable ASCII on purpose: anything else (accents, CJK, emoji, newlines, tabs) goes through byte fallback,
as in the real Phi-3 vocabulary.
"""

TRAINING_TEXT = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the user's questions. The user asks about a picture, and the assistant describes what it
sees in the image: the people, the animals, the objects, the colors and the text that is written on signs.

What is in this image? Describe the picture in detail. How many people are there in the photo? What color is the
car on the left? Is there a dog in the second image? Read the text on the sign. Which of the two images is brighter?
Answer the question with a single word. Please answer yes or no. Explain your answer step by step.

The image shows a small black and white cat sitting on a wooden table next to a window. Behind the cat there is a
green plant in a red pot, and the sun is shining through the glass. In the second picture, two children are playing
with a ball in a park while their parents watch from a bench. There are tall trees, a blue sky with a few clouds,
and a path that leads to a lake where some ducks are swimming.

A man is riding a bicycle down a busy street in the city. He is wearing a yellow jacket, a helmet and dark glasses.
Cars, buses and trucks are waiting at the traffic light, and many people are walking on the sidewalk. On the right
side of the road there is a coffee shop with tables outside, and a woman is reading a newspaper while she drinks
her tea. The buildings are old and made of brick, with large windows and flowers on the balconies.

The chart compares the number of visitors to the museum in each month of the year. The highest value is reached
in July, with about four thousand visitors, and the lowest value is in February. The table below lists the prices
of the products: apples cost two dollars per pound, bread costs three dollars, and milk costs one dollar and fifty
cents. The total amount is seven dollars and fifty cents.

Once upon a time there was a little girl who lived in a house near the forest with her grandmother. Every morning
she walked to the river to get water, and every evening she told stories about the animals she had seen: a fox
with a long tail, an owl that could turn its head, a family of deer and a bear that was looking for honey. One day
she found a strange stone that was shining in the light, and she decided to bring it home to show it to everyone.

Science is the study of the natural world through observation and experiment. Scientists ask questions, make
predictions, collect data and test their ideas. Water boils at one hundred degrees Celsius at sea level, and the
Earth moves around the Sun once every year. Plants use light to make food from water and carbon dioxide, and they
release oxygen into the air. The human body has many systems that work together, such as the heart, the lungs and
the brain.

To answer the question, first look at the whole image, then focus on the important details. If the question asks
for a number, count the objects carefully. If it asks about a position, think about what is on the left, on the
right, in front of or behind the other objects. When you are not sure, say that you cannot tell from the picture.

The weather today is sunny and warm, with a light wind from the west. Tomorrow it will be cloudy, and there may be
rain in the afternoon. It is a good idea to take an umbrella if you are going out. During the winter the days are
short and cold, but in the summer they are long and hot, and many families travel to the beach or the mountains.

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 42 50 64 99 100 128 256 384 512 768 1024 2024 3.14 0.5
The meeting is on Monday, March 4th, at 10:30 am. Call me at 555-0100 or write to the office (room 12, floor 3).

A tool call looks like this: {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}.
The result is a JSON object: {"temperature": 21, "condition": "sunny", "humidity": 0.45, "ok": true, "items": []}.
def add(a, b): return a + b  # a small function; print("hello world") and x = [1, 2, 3] are also code.
Use <tags> and [brackets], some symbols like # $ % & * + - / = @ ^ _ | ~ and `backticks`; it's done!
"""
