"""Refusals of a run's options, in domain terms: the library names the options a refusal concerns by
their keys in the options dict, and a program names them its own way (train.py: as flags).

An OptionError's text is a list of strings and Opt parts. str(err) names options by key
('resume=runs/x: ...'); err.message(name) with the program's naming ('--resume=runs/x: ...')."""


class Opt:
    """An option (and its value) inside the text of an OptionError, named as the reader names it."""
    NONE = object()
    def __init__(self, option, value=NONE):
        self.option, self.value = option, value

    def name(self, name):
        return name(self.option) if self.value is Opt.NONE else name(self.option, self.value)

def plain_name(option, value=Opt.NONE):
    return option if value is Opt.NONE else f'{option}={value}'

def render(text, name=plain_name):
    """Text of strings and Opt parts, with each option named by name(option) or name(option, value)."""
    return ''.join(part.name(name) if isinstance(part, Opt) else part for part in text)

class OptionError(ValueError):
    """A refusal of options. `kind` says which; its text is a list of strings and Opt."""
    def __init__(self, kind, *text):
        self.kind, self.text = kind, text
        super().__init__(self.message())

    def message(self, name=plain_name):
        return render(self.text, name)
