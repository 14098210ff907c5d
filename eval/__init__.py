"""Evaluation of trained models: C-Eval / CMMLU multiple choice and the generation tasks.

Scripts (run from any directory):

    python eval/c_eval.py --data_dir ceval-exam --model_dir model_save/sft/best
    python eval/cmmlu.py --data_dir CMMLU/data --model_dir model_save/sft/best
    python eval/eval_tasks.py --model_dir M --test_file F --task sentiment|entity|bleu
"""
