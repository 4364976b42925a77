"""Divide a raw SIPaKMeD or Herlev download into train/val/test (60/20/20 per class), losing nothing.

Writes <output_dir>/{train,val,test}/<class>/, an empty <output_dir>/models/ and <output_dir>/split.csv
(file, class, split). Copies by default; the source is left as it was.
"""
from pathlib import Path

from fastcore.script import call_parse

from papsmear import division
from papsmear.files import one_line_usage_errors, user_errors

# --- edit these -----------------------------------------------------------------------------------
path_dir = Path("data/sipakmed")                # the raw dataset as downloaded (SIPaKMeD or Herlev)
output_dir = Path("data/sipakmed_formatted")    # receives train/ val/ test/ models/ split.csv
training_size = 0.6                             # fraction of each class for training
validation_size = 0.2                           # fraction of each class for validation
testing_size = 0.2                              # fraction of each class for testing
random_state = 42                               # seed of the split
cropped = False                                 # SIPaKMeD: divide the CROPPED single-cell images instead
group_cells = True                              # with cropped: all cells of one cluster image go to one split
move = False                                    # move the files out of path_dir instead of copying them
force = False                                   # replace a different division already in output_dir
conflicts = "refuse"                            # the same image under two classes: refuse, skip (leave all
                                                # copies out) or keep (each in its class, all in one split)
# ---------------------------------------------------------------------------------------------------

one_line_usage_errors()


@call_parse
def main(path_dir: Path = path_dir,                # the raw dataset as downloaded (SIPaKMeD or Herlev)
         output_dir: Path = output_dir,            # receives train/ val/ test/ models/ split.csv
         training_size: float = training_size,     # fraction of each class for training
         validation_size: float = validation_size,  # fraction of each class for validation
         testing_size: float = testing_size,       # fraction of each class for testing
         random_state: int = random_state,         # seed of the split
         cropped: bool = cropped,                  # SIPaKMeD: divide the CROPPED single-cell images instead
         group_cells: bool = group_cells,          # with cropped: each cluster image's cells in one split
         move: bool = move,                        # move the files out of path_dir instead of copying them
         force: bool = force,                      # replace another division in output_dir, losing no image
         conflicts: str = conflicts):              # same image in two classes: refuse, skip or keep
    "Divide a raw SIPaKMeD or Herlev dataset into train/val/test per class, copying by default."
    with user_errors():
        table, transferred, duplicates = division.divide_dataset(
            path_dir, output_dir, training_size=training_size, validation_size=validation_size,
            testing_size=testing_size, random_state=random_state, cropped=cropped, move=move, force=force,
            group_cells=group_cells, conflicts=conflicts)
        print(table.to_string())
        print(division.duplicates_line(duplicates))
        for warning in division.small_split_warnings(table):
            print(warning)
        if cropped:
            print("Divided by cluster image: the cells NNN_KK of one cluster image NNN are all in one split"
                  if group_cells else "Divided cell by cell (--no-group-cells): cells of one cluster image may "
                  "fall into different splits, which makes test scores optimistic")
        if transferred:
            print(f"{'Moved' if move else 'Copied'} {transferred} files into {output_dir}; "
                  f"the division is in {output_dir / 'split.csv'}")
        else:
            print(f"Nothing to do: {output_dir} already holds this division.")
        print("Next: augment the training split (implementation_DataAugmentation_Extension.py) or train R50.py on "
              f"{output_dir}")
