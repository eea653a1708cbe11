// Greedy generation in llama.cpp (npm's node-llama-cpp), for tests/gguf_export.rs.
// Usage: node generate.mjs INSTALL_DIR JOBS_JSON, where INSTALL_DIR holds node_modules/ with
// node-llama-cpp and JOBS_JSON is [{"model": PATH, "prompt": TEXT, "tokens": N, "through_eog":
// BOOL, "lora": PATH}, ...]; `lora`, optional, is a LoRA adapter GGUF loaded on the model at
// scale 1.
// Prints one JSON line per job: the prompt's and the generated token ids, the generated text,
// and the metadata llama.cpp read. Special tokens in a prompt are parsed as such (a chat
// template's markers); generation stops at N tokens or at an end-of-generation token, unless
// `through_eog` (then it is yielded and generation goes on).
import {join} from "node:path";
import {availableParallelism} from "node:os";
import {pathToFileURL} from "node:url";

const [installDir, jobsJson] = process.argv.slice(2);
const entry = join(installDir, "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama} = await import(pathToFileURL(entry).href);
// The prebuilt CPU library only: never a GPU probe, a download or a build.
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, logLevel: "error"});
// More threads than cores slows llama.cpp down many times on a busy machine.
const threads = Math.min(4, availableParallelism());
for (const job of JSON.parse(jobsJson)) {
    const model = await llama.loadModel({modelPath: job.model});
    const lora = job.lora ? {adapters: [{filePath: job.lora, scale: 1}]} : undefined;
    const context = await model.createContext({contextSize: 512, threads, lora});
    const md = model.fileInfo.metadata;
    // tokenize() parses special tokens but adds none: BOS goes first where the file says so,
    // as llama.cpp's own tokenizer call with add_special does.
    const bos = md.tokenizer.ggml.add_bos_token ? [md.tokenizer.ggml.bos_token_id] : [];
    const promptTokens = [...bos, ...model.tokenize(job.prompt, true)];
    const tokens = [];
    for await (const token of context.getSequence().evaluate(promptTokens, {temperature: 0, yieldEogToken: Boolean(job.through_eog)})) {
        tokens.push(token);
        if (tokens.length >= job.tokens) break;
    }
    console.log(JSON.stringify({
        model: job.model,
        prompt_tokens: promptTokens,
        tokens,
        text: model.detokenize(tokens),
        architecture: md.general.architecture,
        tokenizer_model: md.tokenizer.ggml.model,
        tokenizer_pre: md.tokenizer.ggml.pre ?? null,
        chat_template: md.tokenizer.chat_template ?? null,
        bos: md.tokenizer.ggml.bos_token_id ?? null,
        eos: md.tokenizer.ggml.eos_token_id ?? null,
    }));
    await context.dispose();
    await model.dispose();
}
