"""Write src/bcllm/data/seed_instructions.txt: the bundled seeds of teacher-written calibration text.

What users send, in kinds: questions, instructions, writing tasks, code in a dozen languages (as a
request and as an opening to continue), prose openings to continue, lists, arithmetic word problems
and multi-turn follow-ups ("first turn ||| follow-up"). Built from templates crossed with subjects,
deterministically (seed 0), deduplicated, then checked against both bundled prompt files with
calibration's overlap check: no seed shares a run of 10 words with an evaluation prompt.

    python scripts/make_seeds.py            # rewrites the file, prints counts per kind
"""

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOPICS = ["volcanoes", "the water cycle", "honey bees", "the Silk Road", "black holes", "sourdough bread", "tides",
          "the printing press", "coral reefs", "the immune system", "glaciers", "the Roman aqueducts", "solar panels",
          "chess", "jazz", "the Great Wall of China", "octopuses", "compost", "rainbows", "the Moon's phases",
          "earthquakes", "penguins", "the Industrial Revolution", "vaccines", "wind turbines", "tea", "maple syrup",
          "the Olympic Games", "origami", "lighthouses", "deserts", "the human skeleton", "electric guitars",
          "recycling glass", "bamboo", "the Vikings", "hurricanes", "fermentation", "the stock market", "bridges",
          "the Sahara", "spiders", "photosynthesis", "hot air balloons", "the Renaissance", "submarines", "mushrooms",
          "typewriters", "the Arctic fox", "windmills", "sundials", "the Amazon river", "crossword puzzles",
          "trains", "lichens", "the violin", "paper money", "the periodic table", "kites", "bread yeast",
          "the Northern Lights", "sharks", "the telephone", "ancient Egypt", "camels", "satellites", "cheese",
          "the Andes", "lightning", "the bicycle", "salt", "whales", "the metric system", "clouds", "sleep",
          "the Mayan calendar", "elephants", "batteries", "coffee beans", "the Internet", "forest fires",
          "the Eiffel Tower", "frogs", "microwaves", "the Dead Sea", "carnivorous plants", "migration of birds",
          "the Moon landing", "wool", "the human eye", "snowflakes", "the first computers", "pyramids", "owls"]
QUESTIONS = ["What is the most surprising fact about {t}?", "How would you explain {t} to a child of eight?",
             "Why are {t} important to people?", "What are the common myths about {t}?",
             "Can you give me a short history of {t}?", "How do scientists study {t}?",
             "What would happen if {t} disappeared tomorrow?", "Tell me three things most people get wrong about {t}.",
             "What is the connection between {t} and the weather?", "Who first wrote about {t}, and what did they say?",
             "In two paragraphs, how do {t} work?", "Is it true that {t} are getting rarer? Why?",
             "What questions would a museum guide ask visitors about {t}?",
             "How are {t} portrayed in films and books?", "What is a good beginner's book about {t}?"]
WRITING = ["Write a haiku about {t}.", "Write a limerick about {t}.", "Write a short poem in which {t} speak.",
           "Write a two-sentence advertisement for a museum exhibition on {t}.",
           "Write a quiz of five questions about {t}, with answers.",
           "Write the opening paragraph of a documentary script about {t}.",
           "Write a tweet that makes {t} sound exciting.", "Summarise what you know about {t} in one paragraph.",
           "Write a diary entry by a scientist who has just discovered something new about {t}.",
           "Describe {t} using only words of one syllable."]
LISTS = ["List five facts about {t}.", "Make a bulleted list of the main parts of {t}.",
         "Give me a numbered list of ten words related to {t}.", "List the pros and cons of studying {t} at school.",
         "Make a table with two columns comparing {t} and {u}.", "Name four jobs that involve {t}."]
PEOPLE = ["my landlord", "a new colleague", "my son's teacher", "the council", "an old school friend",
          "a hotel manager", "my team at work", "the neighbours upstairs", "a customer", "the head of the library",
          "my grandmother", "a plumber", "the members of a chess club", "a dentist's receptionist", "my flatmate"]
PURPOSES = ["to ask for a deadline to be moved", "to say thank you for a favour", "to complain about a broken heater",
            "to invite them to a garden party", "to apologise for missing a meeting", "to ask for a refund",
            "to explain why the rent will be late", "to suggest a new meeting time", "to ask for a recommendation letter",
            "to report a lost wallet", "to congratulate them on a new job", "to cancel a booking"]
MESSAGES = ["Write an email to {p} {q}.", "Draft a short text message to {p} {q}.",
            "Write a formal letter to {p} {q}.", "Help me write a friendly note to {p} {q}."]
LANGS = {"Python": ("def {f}({a}):", "#"), "JavaScript": ("function {f}({a}) {{", "//"),
         "TypeScript": ("function {f}({a}: number[]): number {{", "//"), "Java": ("static int {f}(int[] {a}) {{", "//"),
         "C": ("int {f}(const int *{a}, int n) {{", "/*"), "C++": ("int {f}(const std::vector<int>& {a}) {{", "//"),
         "Rust": ("fn {f}({a}: &[i32]) -> i32 {{", "//"), "Go": ("func {f}({a} []int) int {{", "//"),
         "Ruby": ("def {f}({a})", "#"), "PHP": ("function {f}(${a}) {{", "//"), "Kotlin": ("fun {f}({a}: List<Int>): Int {{", "//"),
         "Swift": ("func {f}(_ {a}: [Int]) -> Int {{", "//"), "C#": ("static int {f}(int[] {a}) {{", "//"),
         "Scala": ("def {f}({a}: List[Int]): Int = {{", "//"), "Haskell": ("{f} :: [Int] -> Int", "--"),
         "Lua": ("local function {f}({a})", "--"), "Bash": ("{f}() {{", "#"), "SQL": ("SELECT", "--")}
TASKS = [("sum_even", "return the sum of the even numbers"), ("max_gap", "return the largest difference between neighbours"),
         ("count_runs", "count the runs of equal consecutive values"), ("second_largest", "return the second largest value"),
         ("mean_value", "return the average, or zero for an empty input"), ("count_primes", "count how many values are prime"),
         ("is_sorted", "return 1 if the values are in ascending order, else 0"), ("median", "return the median value"),
         ("longest_rise", "return the length of the longest strictly increasing run"), ("rotate_sum", "rotate left by one and return the first value"),
         ("dedupe_count", "return how many distinct values there are"), ("product_mod", "return the product modulo 1000007"),
         ("find_peak", "return the index of any value larger than both neighbours"), ("range_span", "return max minus min"),
         ("count_negatives", "count the negative values"), ("binary_search", "find a target in a sorted array and return its index or -1"),
         ("moving_sum", "return the largest sum of three consecutive values"), ("majority", "return the value that occurs more than half the time"),
         ("digits_sum", "return the sum of the digits of all values"), ("zero_pairs", "count pairs of values that add up to zero")]
CODE_ASKS = ["Write a {l} function that takes a list of integers; it should {d}.",
             "In {l}, how would I {d2}? Show a short example.", "Explain to a beginner how a {l} function would {d}.",
             "Write unit tests in {l} for a function meant to {d}."]
SQL = ["-- SQL: list the ten customers with the highest total order value in 2023",
       "-- SQL: find employees who earn more than their manager",
       "-- SQL: count the orders per month and show months with no orders as zero",
       "-- SQL: delete duplicate rows from a table of email addresses, keeping the oldest",
       "-- SQL: show each product with its category name, including products without a category",
       "-- SQL: find the second highest salary in each department"]
SHELL = ["Explain what this command does: tar -czf backup.tgz --exclude='*.tmp' ~/projects",
         "Write a Bash loop that pings five hosts from a file and prints which ones are down.",
         "How do I find the ten largest files under my home directory from the terminal?",
         "Write a Makefile with targets build, test and clean for a small C program.",
         "Write a cron line that runs a backup script every Sunday at 3 in the morning.",
         "Write a Dockerfile for a Python web app that listens on port 5000.",
         "What is the difference between git merge and git rebase, in plain words?",
         "Write a regular expression that matches dates like 2024-03-15 and explain each part.",
         "Write a YAML GitHub Actions workflow that runs pytest on every push.",
         "Explain the difference between a process and a thread with a kitchen analogy."]
NAMES = ["Ada", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jakob", "Kwame", "Lucia",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Soren", "Tamsin", "Umar", "Vera", "Wendell", "Ximena"]
PLACES = ["a fishing village", "a night train to Vienna", "the last bakery on Harrow Street", "a research station in Antarctica",
          "an empty swimming pool", "a lighthouse-shaped hotel", "a market in Marrakesh", "a school for clockmakers",
          "a farm at the edge of the moor", "a library that never closes", "a ferry in thick fog", "a rooftop garden",
          "a ski lift stuck in the wind", "a secondhand record shop", "a village with no roads", "an orbiting laboratory"]
EVENTS = ["found a key that fitted no door", "received a postcard from herself", "heard the piano play on its own",
          "was offered a job by a talking crow", "discovered that the map was upside down", "lost the only copy of the recipe",
          "saw the same stranger three days in a row", "was asked to guard a suitcase for one hour",
          "noticed that every clock had stopped at seven", "opened a letter meant for someone else"]
OPENINGS = ["{n} had lived in {p} for six years before she {e}.", "Nobody in {p} was surprised when {n} {e}.",
            "It was raining in {p} on the day {n} {e}.", "The first time {n} {e}, she told no one."]
CONTINUE = ["Continue this story: {s}", "{s}"]
ARITH = ["{n} buys {a} apples at {b} cents each and pays with a {c}-euro note. How much change does {n} get?",
         "A tank holds {a} litres and drains {b} litres a minute. How long until it holds {c} litres?",
         "What is {a} times {b}, minus {c}?", "A recipe for {b} people needs {a} grams of flour. How much for {c} people?",
         "If a car uses {b} litres per 100 km, how much fuel does it need for {a} km?",
         "{n} reads {b} pages a day. How many days to finish a book of {a} pages?",
         "What is {a} percent of {c}0?", "Round {a}.{b}{c} to one decimal place and explain the rule."]
FOLLOW = ["Can you make it shorter?", "Now explain it as if I were five.", "Give me one more example.",
          "What is the most common mistake here?", "Rewrite that in a more formal tone.", "Can you turn that into a list?",
          "Why is that so?", "Translate the first sentence into French."]
REWRITE = ["Rewrite this sentence to sound more polite: \"{s}\"", "Correct the grammar: \"{s}\"",
           "Make this sentence more exciting: \"{s}\"", "Translate into Spanish: \"{s}\""]
PLAIN = ["the meeting is moved to thursday bring the reports", "we was going to the shop but it were closed",
         "send me the file now i need it", "the train is late again and nobody told us why",
         "your order has shipped and will arrive soon", "i cant come to the party sorry",
         "the printer on floor two is broken please fix", "dinner is at eight dont be late",
         "the garden needs watering twice a week in summer", "please stop parking in front of my garage"]


def build(rng: random.Random) -> dict[str, list[str]]:
    kinds = {}
    kinds["question"] = [q.format(t=t) for t in TOPICS for q in rng.sample(QUESTIONS, 5)]
    kinds["writing"] = [w.format(t=t) for t in TOPICS for w in rng.sample(WRITING, 3)]
    kinds["list"] = [s.format(t=t, u=rng.choice(TOPICS)) for t in TOPICS for s in rng.sample(LISTS, 2)]
    kinds["message"] = [m.format(p=p, q=q) for p in PEOPLE for q in PURPOSES for m in [rng.choice(MESSAGES)]]
    code = []
    for lang, (header, comment) in LANGS.items():
        for f, d in rng.sample(TASKS, 10):
            if lang == "SQL":
                continue
            args = "values"
            end = " */" if comment == "/*" else ""
            code.append(f"{header.format(f=f, a=args)} {comment} {lang}: {d}{end}")
            ask = rng.choice(CODE_ASKS)
            code.append(ask.format(l=lang, d=d, d2=d.replace("return", "compute")))
    code += SQL + SHELL
    kinds["code"] = code
    kinds["story"] = [c.format(s=o.format(n=n, p=p, e=e)) for n in NAMES for p in rng.sample(PLACES, 6)
                      for o, e, c in [(rng.choice(OPENINGS), rng.choice(EVENTS), rng.choice(CONTINUE))]]
    kinds["arithmetic"] = [rng.choice(ARITH).format(n=rng.choice(NAMES), a=rng.randint(3, 240), b=rng.randint(2, 19),
                                                    c=rng.randint(2, 50)) for _ in range(260)]
    kinds["rewrite"] = [r.format(s=s) for s in PLAIN for r in REWRITE]
    base = kinds["question"][::7] + kinds["code"][1::9] + kinds["arithmetic"][::6]
    kinds["multi-turn"] = [f"{b} ||| {rng.choice(FOLLOW)}" for b in base]
    return kinds


def main() -> None:
    from bcllm.fit.calib_text import check_overlap
    from bcllm.io.prompts import load_prompts

    kinds = build(random.Random(0))
    seeds, seen = [], set()
    for kind, items in kinds.items():
        for s in items:
            if s not in seen:
                seen.add(s)
                seeds.append(s)
    prompts = load_prompts() + load_prompts(ROOT / "src/bcllm/data/heldout_prompts.txt")
    turns = [s.replace(" ||| ", " ") for s in seeds]
    bad = check_overlap(turns, prompts, force=True)
    assert bad == 0, f"{bad} seeds overlap the evaluation prompts"
    random.Random(0).shuffle(seeds)
    out = ROOT / "src/bcllm/data/seed_instructions.txt"
    out.write_text("\n".join(seeds) + "\n")
    print(f"{len(seeds)} seeds -> {out.relative_to(ROOT)}: " + ", ".join(f"{k} {len(v)}" for k, v in kinds.items()))


if __name__ == "__main__":
    main()
